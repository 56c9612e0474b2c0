"""prunevlm: visual token pruning for stock Hugging Face vision-language models.

The public names are imported on first use, so that `prunevlm --help` and `import prunevlm.cli` do not pay
for torch and transformers.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# the errors prunevlm raises on purpose (docs/errors.md)
_ERRORS = ("PruneError", "InvalidSetting", "InvalidBudget", "InvalidOption", "InvalidConfig", "InvalidInput",
           "InvalidSignals", "Unsupported", "LoadError", "HandleConflict", "Refused", "SignalsUnavailable", "ContractError")
__all__ = ["DEMO_CONFIGS", "DEMO_MODEL", "Budget", "PruneHandle", "Selection", "list_methods", "prune", "select", *_ERRORS]
__version__ = "0.1.0"

_DEMO = Path(__file__).parent / "demo"
DEMO_MODEL = str(_DEMO / "model")  # the bundled demo VLM: a LLaVA-format save_pretrained folder (docs/demo.md)
# VFlowOpt configs calibrated for it (`prunevlm calibrate`), by budget T
DEMO_CONFIGS = {t: str(_DEMO / "configs" / f"vflowopt-T{t}.json") for t in (0.1, 0.25)}

_WHERE = {"Budget": ".budget", "PruneHandle": ".api", "Selection": ".methods", "list_methods": ".api",
          "prune": ".api", "select": ".api", **dict.fromkeys(_ERRORS, ".errors"), "Refused": ".methods.base",
          "SignalsUnavailable": ".methods.base", "ContractError": ".runtime.contract"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'prunevlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
