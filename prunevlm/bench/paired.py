"""Paired comparison of two methods on the same questions: the accuracy difference and its bootstrap
interval (docs/evaluation.md, "Is the text guidance worth it?").

Questions about one image are not independent (the same kept tokens answer all of them), so the bootstrap
resamples images, each with all its questions (a cluster bootstrap), and reads the interval off the
percentiles of the resampled differences."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInput

RESAMPLES = 10_000
LEVEL = 0.95


def paired_difference(a, b, groups, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict:
    """Accuracy of ``a`` minus accuracy of ``b`` (both 0/1 per question, the same questions in the same
    order) with the ``level`` percentile interval over ``resamples`` draws of the groups (``groups[i]`` names
    question i's image). Returns ``{"difference", "low", "high", "questions", "groups"}``."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or len(groups) != len(a) or len(a) == 0:
        raise InvalidInput(f"paired answers need two equal-length 0/1 vectors and one group per question; got "
                           f"{a.shape}, {b.shape} and {len(groups)} groups")
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(index.max()) + 1
    wins = np.bincount(index, weights=a - b, minlength=n_groups)  # per image: (a right) - (b right)
    sizes = np.bincount(index, minlength=n_groups)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(resamples, n_groups))
    resampled = wins[draws].sum(1) / sizes[draws].sum(1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return {"difference": float(wins.sum() / sizes.sum()), "low": float(low), "high": float(high),
            "questions": int(len(a)), "groups": n_groups}
