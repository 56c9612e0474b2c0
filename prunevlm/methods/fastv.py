"""FastV (arXiv 2403.06764): before LLM layer K, keep the m visual tokens that the last prompt token attends
to most at layer K - 1 (docs/baselines.md, FastV). The in-LLM stage runs in `runtime/llm_layers.py`; this
module holds the stage schedule and the ranking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import Budget
from .base import Method, Plan, Refused, option

REFERENCE_DEPTH = 32  # stage layers below are given for 32-layer LLaMA-7B (Vicuna) and scale to the LLM's depth


def scaled_layer(layer: int, num_layers: int, lowest: int = 1) -> int:
    """A layer given for the 32-layer reference scaled to `num_layers`, kept in [lowest, num_layers - 1]."""
    return min(num_layers - 1, max(lowest, round(layer * num_layers / REFERENCE_DEPTH)))


def kept_for_average(budget: Budget, num_tokens: int, layer: int, num_layers: int, name: str) -> int:
    """m such that (K·N + (L - K)·m) / L is as close to the layer-averaged budget as integers allow (all N
    tokens in layers 0..K-1, m from layer K on); refuses a budget below K·N/L, which no m reaches."""
    target = budget.fraction_of(num_tokens) * num_tokens * num_layers
    floor = layer * num_tokens
    if target < floor + 0.5 * (num_layers - layer) - 1e-9:
        raise Refused(
            f"{name}: a layer average of {target / num_layers:.1f} visual tokens is out of reach when layers 0..{layer - 1} "
            f"of {num_layers} hold all {num_tokens} (at least {(floor + num_layers - layer) / num_layers:.1f}); use an "
            f"earlier layer, budget_convention='kept', or a larger budget")
    return min(num_tokens, max(1, round((target - floor) / (num_layers - layer))))


def one_stage(method, budget: Budget, num_tokens: int, num_layers: int) -> tuple[int, int]:
    """(K scaled to the LLM, tokens kept from K on) of a method with one stage, an option `layer` and an
    option `budget_convention` (FastV, DART)."""
    layer = scaled_layer(method.layer, num_layers)
    if method.budget_convention == "kept":
        return layer, budget.tokens_to_keep(num_tokens)
    return layer, kept_for_average(budget, num_tokens, layer, num_layers, method.name)


def last_token_scores(last_attention: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Per-head softmax rows [H, L] averaged over heads, then read at the image's columns (the official order:
    no renormalisation over the image keys, which would reweight the heads). Averaged in fp64 and rounded to
    fp32, so that the ranking is the same on every CPU (`portable.py`)."""
    return last_attention.double().mean(dim=0)[columns].float()


def top_ascending(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` highest scores (ties: the earlier position), ascending."""
    return scores.argsort(descending=True, stable=True)[:count].sort().values


@dataclass
class FastV(Method):
    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = (
        "keep the visual tokens the last prompt token attends to most at layer K-1, from layer K on; "
        "budget = layer-averaged visual tokens"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)
    prunes_in_llm: ClassVar[bool] = True
    llm_signals: ClassVar[tuple[str, ...]] = ("last_attention",)
    decision_lead: ClassVar[int] = 1

    layer: int = option(2, "K, the first layer on the shortened sequence, given for 32 layers and scaled to the "
                           "LLM's depth (at least 1); the paper's title setting", at_least=1)
    budget_convention: str = option(
        "layer_average", "'layer_average': the budget is the visual tokens averaged over the layers (all N before K); "
                         "'kept': the budget is m, the tokens kept from layer K on (DART's scripts, many tables)",
        choices=("layer_average", "kept"))

    def plan(self, budget: Budget, num_tokens: int, num_layers: int) -> Plan:
        layer, kept = one_stage(self, budget, num_tokens, num_layers)
        return Plan((num_tokens, kept), (layer,), num_layers)

    def choose(self, stage, count, columns, real, text, last_attention) -> torch.Tensor:
        return top_ascending(last_token_scores(last_attention, columns), count)
