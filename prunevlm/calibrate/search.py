"""Flow-guided Bayesian search of VFlowOpt's hyper-parameters (docs/vflowopt.md §4), with Optuna.

Searched: θ = (r_v, r_1, t, m, α) under a fixed layer-averaged budget T; r_2 is derived from T. The official
code uses scikit-optimize (archived) with a Gaussian-process surrogate, 27 random initial points and 300
evaluations; here Optuna's `GPSampler` (also a GP with an acquisition function), seeded, with the same counts
by default.

Deviation, on purpose: the official box lets r_2 = (28T − 9r_v − 9r_v·r_1)/(10·r_v·r_1) exceed 1, where it
is capped and the budget is silently missed. Here r_1 is searched as u ∈ [0, 1] mapped onto the r_1 interval
that keeps r_2 in [0.01, 1] for the sampled r_v, so every trial meets the budget and the GP sees a fixed box.
The default configuration is the study's first trial, so the best is never worse than it on the samples.

The study lives in an Optuna storage (a SQLite file by default, or any database URL) so that a killed run
resumes and several workers, on several machines, fill one study with exactly `trials` completed trials
(docs/calibration.md). Unpruned reference states are computed once and cached as safetensors (never
unpickled) next to the storage (or next to the output for a storage URL), keyed on the weights, prompts and images.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import warnings
import zlib

import numpy
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..api import prune
from ..budget import Budget
from ..errors import InvalidSetting
from ..methods.vflowopt import VFlowOpt, default_layers, r_1_for_budget
from .flow import flow_similarity, last_token_states, unusable

BOUNDS = {"t": (0.0, 50.0), "m": (3.0, 24.0), "alpha": (-1.0, 1.0)}  # docs/vflowopt.md §4, as in the official code


def r_v_bounds(budget: float) -> tuple[float, float]:
    """The official r_v range for T = 0.25, [0.25, 0.375], generalised as [T, 1.5 T]."""
    return budget, min(1.0, 1.5 * budget)


MIN_R_2 = 0.01  # r_2 = 0 would drop every visual token after layer k2, so the box stops just short of it


def r_1_bounds(budget: float, r_v: float, layers: tuple[int, int], depth: int) -> tuple[float, float]:
    """r_1 values for which the derived r_2 lies in [MIN_R_2, 1], within the official lower bound 0.8 T / max r_v."""
    low = max(0.8 * budget / r_v_bounds(budget)[1], r_1_for_budget(budget, r_v, 1, layers, depth))
    high = min(1.0, r_1_for_budget(budget, r_v, MIN_R_2, layers, depth))
    return min(low, high), high


def config_from_params(params: dict, budget: float, layers: tuple[int, int], depth: int, fixed: dict | None = None) -> dict:
    """VFlowOpt options from a trial's parameters (u -> r_1), plus options that are not searched."""
    low, high = r_1_bounds(budget, params["r_v"], layers, depth)
    return {"r_v": params["r_v"], "r_1": low + params["u"] * (high - low), "t": params["t"], "m": params["m"],
            "alpha": params["alpha"], "layers": list(layers), **(fixed or {})}


class FlowObjective:
    """Σ_s cos(h_full(s), h_pruned(s)) for a VFlowOpt configuration at budget T."""

    def __init__(self, model, processor, samples: list, budget: Budget, batch_size: int = 16, cache: str | None = None):
        self.model, self.processor, self.samples, self.budget, self.batch_size = model, processor, samples, budget, batch_size
        self.reference = self._references(cache)

    def _references(self, cache: str | None) -> torch.Tensor:
        # keyed on the weights too: a model retrained into the same folder must not reuse old states
        samples = [(self.model.name_or_path, p, _image_digest(i)) for i, p in self.samples]
        key = hashlib.sha256(repr([weights_fingerprint(self.model), samples]).encode()).hexdigest()
        shape = (len(self.samples), self.model.get_input_embeddings().embedding_dim)
        stored = cached_states(cache, key, shape) if cache else None
        if stored is not None:
            return stored
        states = last_token_states(self.model, self.processor, self.samples, self.batch_size)
        problem = unusable(states)
        if problem:
            raise InvalidSetting(f"the unpruned model's last-token states {problem}: every trial would score 0 on "
                                 f"them; load the model in float32 (--dtype float32) or check its weights")
        if cache:
            save_file({"states": states}, cache, metadata={"key": key})
        return states

    def per_sample(self, options: dict) -> torch.Tensor:
        with prune(self.model, VFlowOpt(**options), self.budget):
            pruned = last_token_states(self.model, self.processor, self.samples, self.batch_size)
        return flow_similarity(self.reference, pruned)

    def __call__(self, options: dict) -> float:
        return float(self.per_sample(options).sum())


def cached_states(path: str, key: str, shape: tuple[int, int]) -> torch.Tensor | None:
    """The float32 states of `shape` cached at `path` for `key`, else None (missing, damaged or foreign: recompute).
    The file is safetensors, which holds only tensors and metadata: reading it never runs code."""
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("key") != key or "states" not in f.keys():
                return None
            states = f.get_tensor("states")
    except (OSError, SafetensorError):
        return None
    if states.shape != shape or states.dtype != torch.float32:
        return None
    problem = unusable(states)
    if problem:  # a damaged file under a valid key would make every trial score 0
        warnings.warn(f"the cached unpruned states in {path} {problem}; computing them again", stacklevel=2)
        return None
    return states


def weights_fingerprint(model) -> list[tuple]:
    """Name, shape and float64 sum of every parameter: cheap (no copy), and changed by any retraining."""
    return [(name, tuple(p.shape), float(p.detach().sum(dtype=torch.float64))) for name, p in model.named_parameters()]


def _image_digest(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:16]


def samples_digest(samples: list) -> str:
    """Names the calibration samples (prompts and pixels), so that workers on other samples are refused."""
    return hashlib.sha256(repr([(p, _image_digest(i)) for i, p in samples]).encode()).hexdigest()[:16]


def search_space(budget: float) -> dict:
    """The searched box at T = `budget`, as Optuna distributions: r_v, u (r_1 mapped onto its interval), t, m, α."""
    from optuna.distributions import FloatDistribution

    box = {"r_v": r_v_bounds(budget), "u": (0.0, 1.0), **BOUNDS}
    return {name: FloatDistribution(low, high) for name, (low, high) in box.items()}


def default_params(budget: float, layers: tuple[int, int], depth: int) -> dict:
    """VFlowOpt's default configuration as a point of the search space (`config_from_params` maps it back)."""
    default = VFlowOpt(layers=layers)
    r_v, r_1 = default.rates(budget, layers, depth)
    low, high = r_1_bounds(budget, r_v, layers, depth)
    u = (r_1 - low) / (high - low) if high > low else 0.0
    return {"r_v": r_v, "u": u, "t": default.t, "m": default.m, "alpha": default.alpha}


def sampler(seed: int, initial: int):
    """Optuna's GPSampler after `initial` random trials. Its GP counts the trials other workers are running;
    the random draws are seeded by (seed, trial number), so that workers sharing a study with one --seed draw
    different points, and a study filled by one worker is the same on every run."""
    import optuna

    class TrialSeeded(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study, trial) -> dict:
            return {}

        def sample_relative(self, study, trial, search_space) -> dict:
            return {}

        def sample_independent(self, study, trial, name, distribution):
            state = numpy.random.SeedSequence([seed, trial.number, zlib.crc32(name.encode())]).generate_state(1)
            return optuna.samplers.RandomSampler(seed=int(state[0])).sample_independent(study, trial, name, distribution)

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=initial, independent_sampler=TrialSeeded())


def _is_default(trial) -> bool:
    return bool(trial.user_attrs.get("default"))


def surplus(study, trial, trials: int) -> str | None:
    """Why `trial` must not run, or None: it takes one of the study's `trials` places (the default configuration's
    and trials − 1 searched ones). Trial numbers are given in creation order under a lock on the study, so
    counting the live trials numbered before it decides the race between workers the same way in each."""
    from optuna.trial import TrialState

    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    before = [t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
    if _is_default(trial):
        return "the default configuration is already in the study" if any(map(_is_default, before)) else None
    if sum(not _is_default(t) for t in before) >= trials - 1:
        return f"the study already holds its {trials} trials"
    return None


def run_search(objective: FlowObjective, study, trials: int, depth: int, layers: tuple[int, int] | None = None,
               fixed: dict | None = None, progress: bool = True) -> dict:
    """Optimise until the study holds `trials` completed trials, the first the default configuration; return the
    best configuration's options, with its value, its trial number, the default's value and whether the best is
    the default. `fixed` holds options that are not searched (e.g. the processor's pixel normalisation).

    Each worker runs one trial at a time and stops when the study is full. A trial claimed by a worker that
    stopped sending heartbeats is failed and queued again once; a worker with nothing left to start waits for
    the others' trials, so it is there to take such a retry."""
    import optuna
    from optuna.trial import TrialState

    budget = objective.budget.value  # T, a fraction
    layers = tuple(layers or default_layers(depth))
    space = search_space(budget)
    callbacks = [_Progress(trials)] if progress else []

    def trial_objective(trial) -> float:
        reason = surplus(study, trial, trials)
        if reason:
            trial.set_user_attr("not_run", reason)
            raise optuna.TrialPruned(reason)
        params = {name: trial.suggest_float(name, d.low, d.high) for name, d in space.items()}
        options = config_from_params(params, budget, layers, depth, fixed)
        trial.set_user_attr("r_1", options["r_1"])
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        return objective(options)

    waiting = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed and queued again
        states = [(t.state, _is_default(t)) for t in study.get_trials(deepcopy=False)]
        if not any(d and s in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE) for s, d in states):
            study.enqueue_trial(default_params(budget, layers, depth), user_attrs={"default": True})
            continue
        searched = sum(s == TrialState.COMPLETE and not d for s, d in states)
        if searched >= trials - 1 and (TrialState.COMPLETE, True) in states:
            break
        held = sum(s == TrialState.RUNNING and not d for s, d in states)
        if TrialState.WAITING not in {s for s, _ in states} and searched + held >= trials - 1:
            if progress and not waiting:
                running = sum(s == TrialState.RUNNING for s, _ in states)
                print(f"waiting for the {running} trial(s) other workers run (a dead worker's trial is failed "
                      f"and queued again when its heartbeats stop: docs/calibration.md §3)", file=sys.stderr, flush=True)
            waiting = True
            time.sleep(1)
            continue
        waiting = False
        study.optimize(trial_objective, n_trials=1, callbacks=callbacks)
    best = study.best_trial
    default = next(t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _is_default(t))
    return config_from_params(best.params, budget, layers, depth, fixed) | {
        "value": best.value, "number": best.number, "default_value": default.value, "is_default": _is_default(best)}


class _Progress:
    """A line per finished trial, on stderr."""

    def __init__(self, target: int):
        self.target, self.start = target, time.perf_counter()

    def __call__(self, study, trial) -> None:
        done = study.get_trials(deepcopy=False, states=(trial.state.COMPLETE,))
        value = f"{trial.value:.4f}" if trial.value is not None else trial.user_attrs.get("not_run", "failed")
        best = f"{max(t.value for t in done):.4f}" if done else "-"
        what = " (the default configuration)" if _is_default(trial) else ""
        print(f"trial {trial.number}{what}: {value} (best {best}); {len(done)}/{self.target} complete, "
              f"{time.perf_counter() - self.start:.0f} s", file=sys.stderr, flush=True)
