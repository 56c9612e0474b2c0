"""DivPrune (CVPR'25, arXiv 2503.02175): keep the k most diverse projected tokens, by the greedy for the
Max-Min Diversity Problem (docs/baselines.md, DivPrune).

Distances are cosine distances 1 − cos(v_i, v_j) between the tokens the LLM receives, in fp32 from cosines
computed in fp64 and rounded to fp32, so that the picks are the same on every CPU (`portable.py`). The first
pick is the token whose nearest other token is farthest; each later pick is the token farthest from the
chosen set (its minimum distance to the chosen tokens is largest). The minimum is kept as a running
minimum, O(N) per pick, and a chosen token is never picked again, even among exact duplicates (the
official code can return a token twice; docs/baselines.md lists its deviations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Selection
from .portable import cosines, unit_rows


def cosine_distances(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] with 1 − cos(v_i, v_j) in fp32, the cosine rounded to fp32 first (a zero token
    is at distance 1 from all)."""
    unit = unit_rows(tokens)
    return 1.0 - cosines(unit, unit)


def max_min_order(distances: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy max-min picks, [B, k] in pick order, from [B, N, N] distances (1 <= k < N).

    Ties go to the lowest index (`argmax` returns the first maximum)."""
    batch, num_tokens, _ = distances.shape
    rows = torch.arange(batch, device=distances.device)
    itself = torch.eye(num_tokens, dtype=torch.bool, device=distances.device)
    nearest_other = distances.masked_fill(itself, float("inf")).amin(dim=1)
    picks = [nearest_other.argmax(dim=1)]
    closest = distances[rows, picks[0]].clone()  # each token's distance to the chosen set, so far
    closest[rows, picks[0]] = -float("inf")
    for _ in range(1, k):
        pick = closest.argmax(dim=1)
        picks.append(pick)
        torch.minimum(closest, distances[rows, pick], out=closest)
        closest[rows, pick] = -float("inf")  # chosen: never again, whatever its distance
    return torch.stack(picks, dim=1)


@dataclass
class DivPrune(Method):
    name: ClassVar[str] = "divprune"
    description: ClassVar[str] = (
        "text-agnostic diversity: greedy max-min cosine distance among the projected tokens (LLM input)"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)

    def select(self, k, image_tokens) -> Selection:
        order = max_min_order(cosine_distances(image_tokens), k)
        return Selection(keep=order.sort(dim=1).values, info={"order": order})
