"""Flow-guided Bayesian search of VFlowOpt's hyper-parameters (docs/vflowopt.md §4), with Optuna.

Searched: θ = (r_v, r_1, t, m, α) under a fixed layer-averaged budget T; r_2 is derived from T. The official
code uses scikit-optimize (archived) with a Gaussian-process surrogate, 27 random initial points and 300
evaluations; here Optuna's `GPSampler` (also a GP with an acquisition function), seeded, with the same counts
by default.

Deviation, on purpose: the official box lets r_2 = (28T − 9r_v − 9r_v·r_1)/(10·r_v·r_1) exceed 1, where it
is capped and the budget is silently missed. Here r_1 is searched as u ∈ [0, 1] mapped onto the r_1 interval
that keeps r_2 in [0.01, 1] for the sampled r_v, so every trial meets the budget and the GP sees a fixed box.

The study lives in an Optuna storage (a SQLite file by default, or any storage URL) so that a killed run
resumes and several workers, on several machines, fill one study; each worker stops when the study holds
`trials` completed trials. Unpruned reference states are computed once and cached as safetensors (never
unpickled) next to the storage (or next to the output for a storage URL), keyed on the weights, prompts and images.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..api import prune
from ..budget import Budget
from ..methods.vflowopt import VFlowOpt, default_layers, r_1_for_budget
from .flow import flow_similarity, last_token_states

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
    return states if states.shape == shape and states.dtype == torch.float32 else None


def weights_fingerprint(model) -> list[tuple]:
    """Name, shape and float64 sum of every parameter: cheap (no copy), and changed by any retraining."""
    return [(name, tuple(p.shape), float(p.detach().sum(dtype=torch.float64))) for name, p in model.named_parameters()]


def _image_digest(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:16]


def open_study(storage: str, study: str, seed: int, initial: int):
    """Create or load the study; RDB storages get heartbeats so a killed worker's trial is failed and retried."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, GPSampler
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" not in storage:
        storage = f"sqlite:///{storage}"
    if storage.startswith(("sqlite", "postgresql", "mysql")):
        storage = _rdb_storage(storage)
    sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=initial)
    return optuna.create_study(study_name=study, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True)


def _rdb_storage(url: str):
    """An RDB storage with heartbeats. Workers started together on a new database race to create its tables;
    the loser retries and finds them."""
    import optuna
    import sqlalchemy.exc

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=30, grace_period=120,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)


def run_search(objective: FlowObjective, study, trials: int, depth: int, layers: tuple[int, int] | None = None,
               fixed: dict | None = None, progress: bool = True) -> dict:
    """Optimise until the study holds `trials` completed trials; return the best configuration's options.
    `fixed` holds options that are not searched (e.g. the processor's pixel normalisation)."""
    import optuna

    budget = objective.budget.value  # T, a fraction
    layers = tuple(layers or default_layers(depth))
    study.set_user_attr("budget", budget)
    study.set_user_attr("layers", list(layers))
    low_v, high_v = r_v_bounds(budget)

    def trial_objective(trial) -> float:
        params = {"r_v": trial.suggest_float("r_v", low_v, high_v), "u": trial.suggest_float("u", 0.0, 1.0)}
        params.update({name: trial.suggest_float(name, *bounds) for name, bounds in BOUNDS.items()})
        options = config_from_params(params, budget, layers, depth, fixed)
        trial.set_user_attr("r_1", options["r_1"])
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        return objective(options)

    complete = (optuna.trial.TrialState.COMPLETE,)
    remaining = trials - len(study.get_trials(deepcopy=False, states=complete))
    if remaining > 0:
        study.optimize(trial_objective, n_trials=remaining, show_progress_bar=progress and sys.stderr.isatty(),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=complete), _Progress(trials)])
    best = study.best_trial
    return config_from_params(best.params, budget, layers, depth, fixed) | {"value": best.value, "number": best.number}


class _Progress:
    """A line per trial when the progress bar is off (logs, CI)."""

    def __init__(self, target: int):
        self.target, self.start = target, time.perf_counter()

    def __call__(self, study, trial) -> None:
        if sys.stderr.isatty():
            return
        done = study.get_trials(deepcopy=False, states=(trial.state.COMPLETE,))
        value = "failed" if trial.value is None else f"{trial.value:.4f}"
        best = f"{max(t.value for t in done):.4f}" if done else "-"
        print(f"trial {trial.number}: {value} (best {best}); {len(done)}/{self.target} complete, "
              f"{time.perf_counter() - self.start:.0f} s", file=sys.stderr, flush=True)
