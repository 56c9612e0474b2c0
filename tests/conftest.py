import os
import sys

import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py
torch.set_num_threads(1)  # tiny models gain nothing from threads; one thread keeps timings steady

# Property tests: a modest, reproducible number of examples by default (CI); `make fuzz` selects "fuzz".
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True)
settings.register_profile("fuzz", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "property: hypothesis property test (run at 10,000 examples by `make fuzz`)")


def pytest_report_header(config):
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"
