"""Saved method configurations (e.g. a calibrated VFlowOpt), PEFT-style: JSON that `prune(config=...)` loads."""

from __future__ import annotations

import json
import os

from .budget import Budget
from .methods import get_method, make_method

FORMAT = "prunevlm-config/1"


def save_config(path: str, method: str, budget, options: dict, **provenance) -> dict:
    """Write a configuration (the budget as a plain number); the options are validated by building the method first."""
    make_method(method, **options)
    data = {"format": FORMAT, "method": method, "budget": Budget.of(budget).value, "options": options, **provenance}
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return data


def load_config(config: str | os.PathLike | dict) -> dict:
    """Read and validate a configuration (a path or an already loaded dict); its budget comes back as a Budget."""
    if isinstance(config, dict):
        data = config
    else:
        try:
            with open(config) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the pruning config {config!r}: {error}") from error
    missing = {"method", "budget", "options"} - set(data)
    if missing or data.get("format", FORMAT) != FORMAT:
        raise ValueError(f"not a prunevlm config (format {FORMAT}, with method, budget and options): missing {sorted(missing)}")
    get_method(data["method"])
    budget = Budget.of(data["budget"])
    make_method(data["method"], **data["options"])
    return {**data, "budget": budget}
