import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py
torch.set_num_threads(1)  # tiny models gain nothing from threads; one thread keeps timings steady


def pytest_report_header(config):
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"
