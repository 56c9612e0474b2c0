"""Diversity-preserving partition: VisPruner's iterative bipartite de-duplication (flashvlm.md §1.7).

The residual R (tokens not chosen as important, in descending score order) is shrunk to `keep` tokens:
split R by position into A (even) and B (odd), score each a in A by m(a) = max_b cos(a, b), drop the r
most redundant A-tokens, and continue with [kept A sorted by m descending] + [B].

The released loop recomputes an |A|x|B| product every round, Θ(N³/r) for its fixed r = 8 (flashvlm.md §4.3:
11 s at N = 4608). `bipartite_dedup` computes exactly the same rounds from per-token nearest-neighbour
lists: m(a) is the similarity of a's nearest neighbour that currently sits in B. Dead tokens never come
back, so a list only needs refreshing (against the live tokens) when all its entries have died or sit in A;
that happens for few rows per round. `schedule="geometric"` drops a fixed fraction of R per round instead
(O(log(N/k)) rounds), for the paper's O(N log N)-style claim; see docs/diversity.md for the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, Selection, check_unit

NEIGHBOURS = 64  # length of the nearest-neighbour lists; a speed knob only, results do not depend on it
CHUNK_ROWS = 1024  # rows of the similarity matrix computed at once when building the lists


def drops_per_round(residual: int, keep: int, step: int, schedule: str, ratio: float) -> int:
    """How many A-tokens one round drops (never more than |A|, never past `keep`)."""
    if schedule == "fixed":
        r = step
    elif schedule == "geometric":
        r = max(step, math.ceil(ratio * residual))
    else:
        raise ValueError(f"unknown dedup schedule {schedule!r}; use 'fixed' or 'geometric'")
    return min(r, residual - keep, (residual + 1) // 2)


def bipartite_dedup(
    features: torch.Tensor,
    order: torch.Tensor,
    keep: int,
    step: int = 8,
    schedule: str = "fixed",
    ratio: float = 0.1,
    stats: dict | None = None,
) -> torch.Tensor:
    """Shrink the residual `order` ([B, R] token indices into `features` [B, N, D]) to `keep` tokens.

    Returns [B, keep] token indices (not sorted). `stats`, if given, receives the number of rounds and of
    exact pairwise similarity evaluations.
    """
    batch, residual = order.shape
    if keep >= residual:
        return order
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    if keep == 0:
        return order[:, :0]
    if step < 1:
        raise ValueError(f"dedup step must be >= 1, got {step}")
    num_tokens = features.shape[1]
    unit = F.normalize(features.float() if features.dtype in (torch.float16, torch.bfloat16) else features, dim=-1)
    flat = unit.reshape(batch * num_tokens, -1)
    offsets = (torch.arange(batch, device=order.device) * num_tokens)[:, None]
    order = order + offsets  # global ids into `flat`

    alive = torch.zeros(batch * num_tokens, dtype=torch.bool, device=order.device)
    alive[order.reshape(-1)] = True
    nbr_idx, nbr_sim = _neighbour_lists(unit, order, offsets, alive)
    in_b = torch.zeros_like(alive)
    rounds = pairs = 0
    while residual > keep:
        r = drops_per_round(residual, keep, step, schedule, ratio)
        side_a, side_b = order[:, 0::2], order[:, 1::2]
        in_b[side_b.reshape(-1)] = True
        ids = side_a.reshape(-1)
        # Lists are sorted, so the best entry that sits in B is a's nearest B-token.
        redundancy = torch.where(in_b[nbr_idx[ids]], nbr_sim[ids], -math.inf).amax(dim=1)
        missed = redundancy == -math.inf
        if missed.any():
            pairs += _refresh(flat, num_tokens, side_a.shape[1], ids, missed, in_b, alive, nbr_idx, nbr_sim, redundancy)
        redundancy = redundancy.view(batch, -1)
        ranked = redundancy.argsort(dim=1, descending=True, stable=True)
        dropped = side_a.gather(1, ranked[:, :r])
        alive[dropped.reshape(-1)] = False
        in_b[side_b.reshape(-1)] = False
        order = torch.cat([side_a.gather(1, ranked[:, r:]), side_b], dim=1)
        residual = order.shape[1]
        rounds += 1
    if stats is not None:
        stats.update(rounds=rounds, refresh_pairs=pairs)
    return order - offsets


def _neighbour_lists(unit, order, offsets, alive):
    """Per residual token, its NEIGHBOURS most similar other residual tokens (global ids, descending)."""
    batch, num_tokens, _ = unit.shape
    width = min(NEIGHBOURS, order.shape[1] - 1)
    nbr_idx = torch.zeros(batch * num_tokens, max(width, 1), dtype=torch.long, device=unit.device)
    nbr_sim = torch.full(nbr_idx.shape, -math.inf, dtype=unit.dtype, device=unit.device)
    if width < 1:
        return nbr_idx, nbr_sim
    for b in range(batch):
        members = order[b] - offsets[b]
        member_feats = unit[b, members]
        for start in range(0, members.numel(), CHUNK_ROWS):
            rows = members[start : start + CHUNK_ROWS]
            sim = unit[b, rows] @ member_feats.T
            sim[torch.arange(rows.numel()), torch.arange(start, start + rows.numel())] = -math.inf  # not itself
            values, where = sim.topk(width, dim=1)
            nbr_idx[rows + offsets[b], :width] = members[where] + offsets[b]
            nbr_sim[rows + offsets[b], :width] = values
    return nbr_idx, nbr_sim


def _refresh(flat, num_tokens, per_image, ids, missed, in_b, alive, nbr_idx, nbr_sim, redundancy) -> int:
    """Exact m(a) for A-tokens whose list holds no B-token; rebuild their lists from the live tokens."""
    pairs = 0
    width = nbr_idx.shape[1]
    missed_by_batch = missed.view(-1, per_image)
    for b in torch.nonzero(missed_by_batch.any(dim=1)).flatten().tolist():
        where = torch.nonzero(missed_by_batch[b]).flatten() + b * per_image
        rows = ids[where]
        own = slice(b * num_tokens, (b + 1) * num_tokens)
        sim = flat[rows] @ flat[own].T  # against the whole image: no copy of the feature matrix
        pairs += sim.numel()
        local = rows - b * num_tokens
        sim[torch.arange(rows.numel()), local] = -math.inf  # not itself
        sim[:, ~alive[own]] = -math.inf
        redundancy[where] = torch.where(in_b[own], sim, -math.inf).amax(dim=1)
        take = min(width, int(alive[own].sum()) - 1)
        values, pos = sim.topk(take, dim=1)
        nbr_idx[rows, :take] = pos + b * num_tokens
        nbr_sim[rows, :take] = values
        nbr_sim[rows, take:] = -math.inf
    return pairs


def important_and_diverse(
    scores: torch.Tensor,
    features: torch.Tensor,
    k: int,
    alpha: float = 0.5,
    step: int = 8,
    schedule: str = "fixed",
    ratio: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ⌊alpha·k⌋ top-scored tokens and fill the rest by de-duplicating the residual (flashvlm.md §1.6).

    Returns (keep [B, k] ascending, important [B, ⌊alpha·k⌋], diverse [B, k - ⌊alpha·k⌋]).
    """
    num_important = math.floor(alpha * k)
    ranked = scores.argsort(dim=-1, descending=True, stable=True)
    important, residual = ranked[:, :num_important], ranked[:, num_important:]
    diverse = bipartite_dedup(features, residual, k - num_important, step=step, schedule=schedule, ratio=ratio)
    keep = torch.cat([important, diverse], dim=1).sort(dim=1).values
    return keep, important, diverse


@dataclass
class ImportantDiverse(Method):
    """Shared options and split for methods that keep an important share and fill the rest by diversity."""

    alpha: float = 0.5  # share of the budget taken by the top score (flashvlm.md §1.6)
    dedup_step: int = 8  # tokens dropped per de-duplication round (§1.7)
    dedup_schedule: str = "fixed"  # "fixed" as released, or "geometric" (module docstring)
    dedup_ratio: float = 0.1  # fraction of the residual dropped per round when geometric

    def __post_init__(self):
        check_unit(f"{self.name}: alpha", self.alpha, closed_low=True)
        check_unit(f"{self.name}: dedup_ratio", self.dedup_ratio)
        if int(self.dedup_step) != self.dedup_step or self.dedup_step < 1:
            raise ValueError(f"{self.name}: dedup_step must be an int >= 1, got {self.dedup_step}")
        if self.dedup_schedule not in ("fixed", "geometric"):
            raise ValueError(f"{self.name}: dedup_schedule must be 'fixed' or 'geometric', got {self.dedup_schedule!r}")

    def split(self, scores: torch.Tensor, features: torch.Tensor, k: int) -> Selection:
        keep, important, diverse = important_and_diverse(
            scores, features, k, self.alpha, int(self.dedup_step), self.dedup_schedule, self.dedup_ratio
        )
        return Selection(keep=keep, scores=scores, info={"important": important, "diverse": diverse})
