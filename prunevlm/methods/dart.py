"""DART (arXiv 2502.11494): before LLM layer K, pivot tokens (the largest L1 key norms at layer K - 1, among
the image and among the text after it) each pick the visual tokens least similar to them, so duplicates go
(docs/baselines.md, DART). Key norms and cosines are computed in fp64 and rounded to fp32, so that the choice is
the same on every CPU (`portable.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import Budget
from .base import Method, Plan, option
from .fastv import one_stage
from .portable import cosines, unit_rows


def least_duplicated(similarity: torch.Tensor, pool: torch.Tensor, quotas: list[int]) -> torch.Tensor:
    """Greedy fill: pivot i (rows of `similarity` [P, n], in visiting order) takes the quotas[i] tokens of the
    pool (bool [n]) least similar to it; each taken token leaves the pool. Returns the pool left (bool [n])."""
    pool = pool.clone()
    for row, quota in zip(similarity, quotas):
        picked = row.masked_fill(~pool, torch.inf).argsort(stable=True)[:quota]
        pool[picked] = False
    return pool


def official_count(kept: int, num_tokens: int, image_pivots: int, text_pivots: int) -> int:
    """The official kept count for a truncation budget B: p_i + (p_i + p_t)·⌊B/(p_i + p_t)⌋ (overshoots B)."""
    pivots = image_pivots + text_pivots
    return min(num_tokens, image_pivots + pivots * (kept // pivots))


@dataclass
class DART(Method):
    name: ClassVar[str] = "dart"
    description: ClassVar[str] = (
        "DART: pivots by key norm at layer K-1 keep the visual tokens least duplicated with them, from layer K on; "
        "budget = layer-averaged visual tokens"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)
    prunes_in_llm: ClassVar[bool] = True
    llm_signals: ClassVar[tuple[str, ...]] = ("prior_keys", "normed_input")

    layer: int = option(2, "K, the first layer on the shortened sequence, given for 32 layers and scaled to the "
                           "LLM's depth (at least 1)", at_least=1)
    image_pivots: int = option(4, "p_i, pivots among the image tokens (kept)", at_least=1)
    text_pivots: int = option(4, "p_t, pivots among the text after the image (anchors only)", at_least=0)
    quota: str = option("exact", "'exact': the last pivot takes the remainder, so exactly the planned count is kept; "
                                 "'official': p_i + (p_i + p_t)·⌊B/(p_i + p_t)⌋ tokens, above the budget B",
                        choices=("exact", "official"))
    budget_convention: str = option(
        "layer_average", "'layer_average': the budget is the visual tokens averaged over the layers (all N before K); "
                         "'kept': the budget is the tokens kept from layer K on (DART's scripts)",
        choices=("layer_average", "kept"))

    def plan(self, budget: Budget, num_tokens: int, num_layers: int) -> Plan:
        layer, kept = one_stage(self, budget, num_tokens, num_layers)
        if self.quota == "official" and kept < num_tokens:
            kept = official_count(kept, num_tokens, self.image_pivots, self.text_pivots)
        return Plan((num_tokens, kept), (layer,), num_layers)

    def choose(self, stage, count, columns, real, text, prior_keys, normed_input) -> torch.Tensor:
        norms = prior_keys.double().abs().sum(dim=-1).float()  # [L] L1 norm of each position's keys
        by_norm = norms[columns].argsort(descending=True, stable=True)
        image_pivots = by_norm[: min(self.image_pivots, count)]
        if image_pivots.numel() == count:
            return image_pivots.sort().values
        after = torch.nonzero(text & (torch.arange(text.numel(), device=text.device) > columns[-1])).flatten()
        text_pivots = after[norms[after].argsort(descending=True, stable=True)[: self.text_pivots]]
        # every pivot, visited by descending key norm (the official code visits them in set order)
        pivots = torch.cat([columns[image_pivots], text_pivots])
        pivots = pivots[norms[pivots].argsort(descending=True, stable=True)]
        hidden = unit_rows(normed_input)
        similarity = cosines(hidden[pivots], hidden[columns])  # [P, n] cosine of each pivot with each image token
        share, rest = divmod(count - image_pivots.numel(), pivots.numel())
        quotas = [share] * pivots.numel()
        quotas[-1] += rest
        pool = torch.ones(columns.numel(), dtype=torch.bool, device=columns.device)
        pool[image_pivots] = False
        return torch.nonzero(~least_duplicated(similarity, pool, quotas)).flatten()
