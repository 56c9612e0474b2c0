# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a bare `torch` would pull several GB of CUDA packages.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo bench test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[calibrate,plot,dev]"
	touch $@

demo: setup
	$(VENV)/bin/prunevlm demo

bench: setup
	$(VENV)/bin/prunevlm bench

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
