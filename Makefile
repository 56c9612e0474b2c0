# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a bare `torch` would pull several GB of CUDA packages.
TORCH_PIN ?= torch==2.13.0
EXTRAS := .[calibrate,plot,video,dev]
# The exact versions the set-up installs; `make lock` refreshes it.
LOCK := requirements.lock
# The lowest transformers pyproject.toml allows: CI tests it beside the locked and the newest versions.
OLDEST_TRANSFORMERS := transformers==5.23.0
# The lmms-eval release the plugin is tested with (make test-lmms).
LMMS_EVAL := lmms-eval==0.7.3
# The commit holding version 1 of the demo model, which `make retrain-demo` starts from (docs/demo.md).
DEMO_V1 := 61d93dd

# $(call fresh_venv,DIR,MORE_PIP_ARGUMENTS): a new venv with the CPU torch and this project (editable).
define fresh_venv
	rm -rf $(1)
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q $(TORCH_PIN)
	$(1)/bin/python -m pip install -q -e "$(EXTRAS)" $(2)
endef

.PHONY: setup demo bench test test-kernels fuzz test-newest test-oldest venv-newest venv-oldest suite-newest suite-oldest test-lmms retrain-demo lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call fresh_venv,$(VENV),-c $(LOCK))
	touch $@

demo: setup
	$(VENV)/bin/prunevlm demo

bench: setup
	$(VENV)/bin/prunevlm bench

# Version 2 of the demo model from version 1's weights (about an hour on 2 cores; docs/demo.md, "Model card"):
# out/demo-model is the result, out/demo-model/demo_train.json its log, out/demo-ckpt resumes a broken run.
retrain-demo: setup
	rm -rf out/demo-v1 && mkdir -p out/demo-v1
	git archive $(DEMO_V1) prunevlm/demo/model | tar -x --strip-components=3 -C out/demo-v1
	$(PY) -m prunevlm.demo.train --init out/demo-v1 --out out/demo-model --seed 0 --threads 2 --checkpoints out/demo-ckpt

test: setup
	$(PY) -m pytest

# The selection tests again under another machine's rounding (docs/diversity.md, "Same result on every CPU"):
# MKL's SSE4.2 kernels with torch's own kernels off AVX2/AVX512, then one thread. A test that depends on the
# CPU's rounding fails here, not on a user's machine.
# (tests/test_portability.py is left out: it runs its cases under both environments itself.)
SELECTION_TESTS := tests/test_methods.py tests/test_batched.py tests/test_properties.py
test-kernels: setup
	MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default $(PY) -m pytest $(SELECTION_TESTS)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest $(SELECTION_TESTS)

# The property tests at 10,000 examples each (CI runs them at 50; profiles in tests/conftest.py).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -m property

# The suite where pip resolves every dependency to its newest allowed release (torch pinned as above), and on the
# lowest allowed transformers. Each venv is built fresh (so a new release is met the day it is out); building
# and running are separate targets so that CI can build them one after the other (each editable install writes
# the same egg-info) and run the suites at once.
test-newest: venv-newest
	$(MAKE) suite-newest
test-oldest: venv-oldest
	$(MAKE) suite-oldest
venv-newest:
	$(call fresh_venv,.venv-newest,)
venv-oldest:
	$(call fresh_venv,.venv-oldest,"$(OLDEST_TRANSFORMERS)")
suite-newest:
	.venv-newest/bin/python -m pytest
suite-oldest:
	.venv-oldest/bin/python -m pytest

# The real lmms-eval running the plugin (tests/test_lmms_eval.py; docs/lmms-eval.md), in its own venv:
# lmms-eval without its declared dependencies (through torchvision they would replace the CPU torch), what it
# runs on from the lmms-eval extra, and the model's stack at the locked versions (the rest of the lock is not
# imposed: lmms-eval needs filelock < 4, its results table python-dateutil < 3).
LMMS_LOCKED := ^(transformers|tokenizers|huggingface.hub|safetensors|numpy|pillow|tqdm)==
test-lmms:
	rm -rf .venv-lmms
	python3 -m venv .venv-lmms
	.venv-lmms/bin/python -m pip install -q $(TORCH_PIN)
	grep -iE '$(LMMS_LOCKED)' $(LOCK) > .venv-lmms/constraints.txt
	.venv-lmms/bin/python -m pip install -q -e ".[dev,lmms-eval]" -c .venv-lmms/constraints.txt
	.venv-lmms/bin/python -m pip install -q --no-deps $(LMMS_EVAL)
	.venv-lmms/bin/python -m pytest tests/test_lmms_eval.py

# Refresh $(LOCK) with the newest allowed releases; then `make test` and commit it.
lock:
	$(call fresh_venv,.venv-lock,)
	.venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-newest .venv-oldest .venv-lock .venv-lmms build *.egg-info
