"""Saved method configurations (e.g. a calibrated VFlowOpt), PEFT-style: JSON that `prune(config=...)` loads."""

from __future__ import annotations

import dataclasses
import json
import os

from .budget import Budget, check_budget_scope, check_video_scope
from .errors import InvalidConfig
from .methods import get_method, make_method

FORMAT = "prunevlm-config/1"
# what prune() reads; budget_scope and video_scope may be absent (configs written before the options)
FIELDS = ("format", "method", "budget", "budget_scope", "video_scope", "options")
# what `prunevlm calibrate` records beside them, for people (prune() reads none of it)
PROVENANCE = ("model", "study", "storage", "trials", "seed", "best_trial", "best_is_default", "objective", "default_objective",
              "samples", "holdout", "versions")


def save_config(path: str, method: str, budget, options: dict, budget_scope: str = "per_image",
                video_scope: str = "per_frame", **provenance) -> dict:
    """Write a configuration with every option of the method (the given ones, defaults for the rest), so the
    file means the same after a release changes a default. The budget is stored as a plain number, with the
    scopes it counts in (prune's budget_scope and video_scope). `provenance` takes the PROVENANCE keys, which load_config
    accepts back."""
    unknown = sorted(set(provenance) - set(PROVENANCE))
    if unknown:
        raise InvalidConfig(f"save_config: {unknown} are not provenance fields a config may carry; use {', '.join(PROVENANCE)} "
                            f"(or add the name to config.PROVENANCE)")
    built = make_method(method, **options)
    complete = {f.name: getattr(built, f.name) for f in dataclasses.fields(built) if f.init}
    data = {"format": FORMAT, "method": method, "budget": Budget.of(budget).value,
            "budget_scope": check_budget_scope(budget_scope), "video_scope": check_video_scope(video_scope),
            "options": complete, **provenance}
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return data


def load_config(config: str | os.PathLike | dict) -> dict:
    """Read and validate a configuration (a path or an already loaded dict), field by field (docs/errors.md):
    the format, no unknown key, the method, the budget, and each option against the method's declared type
    and range; the options a calibration sets (`option(calibrated=True)`) must be present. Its budget comes
    back as a Budget, its budget_scope and video_scope as written ("per_image" and "per_frame" where a config
    from before the option has none). Every fault is an InvalidConfig naming the config."""
    source = "the pruning config" if isinstance(config, dict) else f"the pruning config {os.fspath(config)!r}"
    if isinstance(config, dict):
        data = config
    else:
        try:
            with open(config) as f:
                data = json.load(f)
        except RecursionError:
            raise InvalidConfig(f"cannot read {source}: its JSON is nested too deeply; a config is one object of "
                                f"{', '.join(FIELDS)}") from None
        except (OSError, ValueError) as error:  # ValueError: not JSON, or an int of more digits than Python reads
            raise InvalidConfig(f"cannot read {source}: {error}") from None
    if not isinstance(data, dict):
        raise InvalidConfig(f"{source}: must be a JSON object with format, method, budget and options")
    if "format" not in data:
        raise InvalidConfig(f"{source}: lacks format: a config written by save_config starts with "
                            f'"format": "{FORMAT}"; add it if the rest was written for this version')
    if data["format"] != FORMAT:
        raise InvalidConfig(f"{source}: has format {data['format']!r}; this prunevlm reads {FORMAT!r} "
                            f"(re-save it with this version, or install the prunevlm that wrote it)")
    missing = [key for key in ("method", "budget", "options") if key not in data]
    if missing:
        raise InvalidConfig(f"{source}: lacks {', '.join(missing)}: a config holds format, method, budget and options")
    unknown = [key for key in data if key not in FIELDS + PROVENANCE]
    if unknown:
        raise InvalidConfig(f"{source}: has unknown key(s) {unknown}: a config holds {', '.join(FIELDS)} and the "
                            f"provenance calibrate writes ({', '.join(PROVENANCE)}); fix or remove them")
    try:
        cls = get_method(data["method"])
        budget = Budget.of(data["budget"])
        budget_scope = check_budget_scope(data.get("budget_scope", "per_image"))
        video_scope = check_video_scope(data.get("video_scope", "per_frame"))
        options = data["options"]
        if not isinstance(options, dict):
            raise InvalidConfig(f"options must be an object of option names to values, got {options!r}")
        required = [h["name"] for h in cls.option_help() if h["calibrated"] and h["name"] not in options]
        if required:
            raise InvalidConfig(f"{cls.name} options {required} are missing: they are what a calibration sets; "
                                f"give them (prunevlm methods --verbose lists each) or calibrate again")
        make_method(cls.name, **options)
    except (ValueError, TypeError) as error:
        raise InvalidConfig(f"{source}: {error}") from None
    return {**data, "budget": budget, "budget_scope": budget_scope, "video_scope": video_scope}
