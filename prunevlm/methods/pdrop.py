"""PyramidDrop (arXiv 2410.17247): at stage layers l1 < l2 < l3 the visual tokens shrink to ⌊N·λ⌋, ⌊N·λ²⌋,
⌊N·λ³⌋, ranked by the last prompt token's attention at the stage layer itself, on its input
(docs/baselines.md, PyramidDrop). λ is solved from the layer-averaged budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import Budget
from .base import Method, Plan, Refused, option
from .fastv import last_token_scores, scaled_layer, top_ascending
from ..errors import InvalidOption


def pyramid_counts(num_tokens: int, ratio: float, stages: int) -> tuple[int, ...]:
    """⌊N·λ^i⌋ for i = 0..stages (at least one token), N being the original count at every stage."""
    return tuple(max(1, math.floor(num_tokens * ratio ** i + 1e-9)) for i in range(stages + 1))


def stage_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Stage layers given for 32 layers, scaled to `num_layers`, kept strictly increasing in [1, L - 1]."""
    if num_layers <= len(layers):
        raise Refused(f"pdrop: {len(layers)} stages need an LLM of more than {len(layers)} layers, got {num_layers}")
    scaled = []
    for i, layer in enumerate(layers):
        low = scaled[-1] + 1 if scaled else 1
        scaled.append(min(num_layers - len(layers) + i, max(low, scaled_layer(layer, num_layers))))
    return tuple(scaled)


def solve_ratio(target: float, num_tokens: int, layers: tuple[int, ...], num_layers: int) -> float:
    """λ in (0, 1] whose counts' layer average is nearest `target` (in tokens). The average is a non-decreasing
    step function of λ: bisection brackets the step that crosses the target, and the nearer side wins."""
    def average(ratio: float) -> float:
        return Plan(pyramid_counts(num_tokens, ratio, len(layers)), layers, num_layers).layer_average

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < target else (low, middle)
    return high if low == 0.0 or abs(average(high) - target) <= abs(average(low) - target) else low


@dataclass
class PyramidDrop(Method):
    name: ClassVar[str] = "pdrop"
    description: ClassVar[str] = (
        "PyramidDrop: visual tokens shrink by λ at three LLM layers, ranked by the last prompt token's attention; "
        "λ solved for the layer-averaged budget"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)
    prunes_in_llm: ClassVar[bool] = True
    llm_signals: ClassVar[tuple[str, ...]] = ("last_attention",)

    layers: tuple[int, int, int] = option((8, 16, 24), "stage layers l1 < l2 < l3 given for 32 layers, scaled to the "
                                                       "LLM's depth (paper default; (2, 8, 16) reaches 64 tokens)")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.layers[0] < self.layers[1] < self.layers[2]:
            raise InvalidOption(f"pdrop: option layers must be 1 <= l1 < l2 < l3, got {self.layers}")

    def plan(self, budget: Budget, num_tokens: int, num_layers: int) -> Plan:
        layers = stage_layers(self.layers, num_layers)
        target = budget.fraction_of(num_tokens) * num_tokens
        if target >= num_tokens:
            return Plan((num_tokens,) * 4, layers, num_layers)
        lowest = Plan(pyramid_counts(num_tokens, 0.0, 3), layers, num_layers).layer_average
        if target < lowest - 0.5:
            raise Refused(
                f"pdrop: a layer average of {target:.1f} visual tokens is out of reach with stage layers {layers} of "
                f"{num_layers} (at least {lowest:.1f}: layers 0..{layers[0] - 1} hold all {num_tokens}); move the first "
                f"stage earlier, e.g. layers=(2, 8, 16)")
        counts = pyramid_counts(num_tokens, solve_ratio(target, num_tokens, layers, num_layers), 3)
        return Plan(counts, layers, num_layers)

    def choose(self, stage, count, columns, real, text, last_attention) -> torch.Tensor:
        return top_ascending(last_token_scores(last_attention, columns), count)
