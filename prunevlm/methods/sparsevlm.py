"""SparseVLM, v1.5 code (arXiv 2410.04417): text raters chosen from the prompt's input embeddings score the
visual tokens by their attention at three LLM layers; each stage keeps the best and recycles some of the
deleted ones as cluster means (docs/baselines.md, SparseVLM). The rater shares, scores, distances and densities
are computed in fp64 and rounded to fp32 before they are compared, so that the choice is the same on every CPU
(`portable.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import Budget
from .base import Method, Plan, Refused, option
from .pdrop import stage_layers
from ..errors import InvalidOption

# The v1.5 tables (the `main` branch adds 96): budget -> visual tokens after each pruning layer, recycled
# tokens included; they give the shape of the schedule, rescaled to the budget (docs/baselines.md)
TABLES = {192: (309, 204, 113), 128: (312, 117, 39), 96: (249, 55, 27), 64: (82, 32, 18)}
TABLE_TOKENS, TABLE_LAYERS = 576, (3, 7, 16)  # pruning at the outputs of layers 2, 6, 15: from layers 3, 7, 16


def recycled_count(deleted: int) -> int:
    """Clusters made of D deleted tokens: ⌊m/10⌋ + 1 of the m = ⌊0.3·D⌋ + 1 best deleted (none if D = 0)."""
    return 0 if deleted == 0 else (math.floor(0.3 * deleted) + 1) // 10 + 1


def kept_for_total(alive: int, total: int, recycle: bool) -> int:
    """The most originals to keep of `alive` so that they and the recycled tokens make `total` (kept + recycled
    grows by 0 or 1 per kept token, so every total from its minimum up is met exactly)."""
    if not recycle or total >= alive:
        return total
    if total < recycled_count(alive):
        raise Refused(f"sparsevlm: {total} of {alive} visual tokens is below what recycling alone makes "
                         f"({recycled_count(alive)} cluster means); raise the budget or set recycle=False")
    return next(k for k in range(total, -1, -1) if k + recycled_count(alive - k) == total)


def raters(embeddings: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Text positions whose share p_t = mean over visual rows of softmax_t(V·Tᵀ) exceeds 1/|T|; all of the text
    when none does (uniform p, a single text token), where the official code averages over no rater (NaN)."""
    relevance = (embeddings[image].double() @ embeddings[text].double().T).softmax(dim=-1).mean(dim=0).float()
    chosen = text[relevance > 1.0 / text.numel()]
    return chosen if chosen.numel() else text


def rater_scores(queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, real: torch.Tensor,
                 columns: torch.Tensor) -> torch.Tensor:
    """Mean over rater rows of the head-mean causal softmax attention (over all real keys) at `columns`."""
    logits = queries[:, rows].double() @ keys.double().transpose(-1, -2)  # [H, R, L]
    positions = torch.arange(keys.shape[1], device=keys.device)
    allowed = real[None, :] & (positions[None, :] <= rows[:, None])
    attention = logits.masked_fill(~allowed, -torch.inf).softmax(dim=-1)
    return attention.mean(dim=0)[:, columns].mean(dim=0).float()


def dpc_knn(tokens: torch.Tensor, clusters: int) -> torch.Tensor:
    """Cluster index of each of the m tokens [m, C] into `clusters` groups by density peaks with kNN density:
    d = ‖x_i − x_j‖/√C; ρ_i = exp(−mean d² to its `clusters` nearest, itself included); δ_i = distance to the
    nearest denser token (the largest distance for the densest); centres = top ρ·δ; every token joins its
    nearest centre. Ties go to the earlier token (the official code breaks them with random noise)."""
    tokens = tokens.double()
    distance = (torch.cdist(tokens, tokens) / math.sqrt(tokens.shape[-1])).float()
    near = distance.topk(min(clusters, tokens.shape[0]), dim=-1, largest=False).values
    density = torch.exp(-(near.double() ** 2).mean(dim=-1)).float()
    order = torch.arange(tokens.shape[0], device=tokens.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (order[None, :] < order[:, None]))
    delta = torch.where(denser, distance, torch.inf).amin(dim=-1)
    delta = torch.where(torch.isinf(delta), distance.max(), delta)
    centres = (density * delta).argsort(descending=True, stable=True)[:clusters]
    assignment = distance[:, centres].argmin(dim=-1)
    assignment[centres] = torch.arange(centres.numel(), device=tokens.device)
    return assignment


@dataclass
class SparseVLM(Method):
    name: ClassVar[str] = "sparsevlm"
    description: ClassVar[str] = (
        "SparseVLM v1.5: prompt raters score visual tokens by attention at three LLM layers, deleted tokens "
        "partly recycled as cluster means; budget = layer-averaged visual tokens"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)
    prunes_in_llm: ClassVar[bool] = True
    llm_signals: ClassVar[tuple[str, ...]] = ("layer_queries", "layer_keys", "input", "embeddings")
    decision_lead: ClassVar[int] = 1

    layers: tuple[int, int, int] = option(TABLE_LAYERS, "first layers on each stage's shortened sequence (pruning at "
                                                        "the outputs of layers 2, 6, 15), given for 32 layers")
    recycle: bool = option(True, "merge the best ⌊0.3·D⌋ + 1 of the D deleted tokens into ⌊m/10⌋ + 1 cluster means "
                                 "(v1.5 code)")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.layers[0] < self.layers[1] < self.layers[2]:
            raise InvalidOption(f"sparsevlm: option layers must be 1 <= l1 < l2 < l3, got {self.layers}")

    def plan(self, budget: Budget, num_tokens: int, num_layers: int) -> Plan:
        """The official table nearest the budget gives the shape (fractions of 576 per stage); it is scaled so
        that the layer average of what the layers process meets the budget, the last count absorbing the
        rounding, each count at most the previous one and at least what recycling alone adds."""
        layers = stage_layers(self.layers, num_layers)
        target = budget.fraction_of(num_tokens) * num_tokens * num_layers
        if target >= num_tokens * num_layers:
            return Plan((num_tokens,) * 4, layers, num_layers)
        spans = [b - a for a, b in zip(layers, (*layers[1:], num_layers))]
        tables = {k: Plan((TABLE_TOKENS, *t), TABLE_LAYERS, 32).layer_average / TABLE_TOKENS for k, t in TABLES.items()}
        shape = [n / TABLE_TOKENS * num_tokens for n in TABLES[min(tables, key=lambda k: abs(tables[k] - target / num_layers / num_tokens))]]
        scale = (target - layers[0] * num_tokens) / sum(s * n for s, n in zip(spans, shape))
        counts = [num_tokens]
        for stage in range(3):
            if stage < 2:
                wanted = round(scale * shape[stage])
            else:  # the last stage meets the average as closely as integers allow
                wanted = round((target - layers[0] * num_tokens - sum(n * s for n, s in zip(counts[1:], spans))) / spans[2])
            alive = counts[-1]
            lowest = recycled_count(alive) if self.recycle else 1
            counts.append(min(alive, max(lowest, 1, wanted)))
        plan = Plan(tuple(counts), layers, num_layers)
        if plan.layer_average > target / num_layers + 0.5:
            raise Refused(
                f"sparsevlm: a layer average of {target / num_layers:.1f} visual tokens is out of reach with stage "
                f"layers {layers} of {num_layers} (this schedule gives at least {plan.layer_average:.1f}: layers "
                f"0..{layers[0] - 1} hold all {num_tokens}); move the stages earlier or use a larger budget")
        return plan

    def choose(self, stage, count, columns, real, text, layer_queries, layer_keys, input, embeddings):
        positions = torch.arange(real.numel(), device=real.device)
        after = positions[text & (positions > columns[-1])]
        if after.numel() == 0:  # no text after the image: the last prompt token rates
            after = positions[real][-1:]
        scores = rater_scores(layer_queries, layer_keys, raters(embeddings, columns, after), real, columns)
        kept = kept_for_total(columns.numel(), count, self.recycle)
        ranked = scores.argsort(descending=True, stable=True)
        keep = ranked[:kept]
        if not self.recycle or kept == count:
            return keep.sort().values
        deleted = ranked[kept:]
        candidates = deleted[: math.floor(0.3 * deleted.numel()) + 1]  # the best deleted, by score
        clusters = count - kept
        assignment = dpc_knn(input[columns[candidates]], clusters)
        weights = torch.zeros(clusters, columns.numel(), device=input.device)
        weights[assignment, candidates] = 1.0
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # each merged token sits at the slot (and position) of its best-scored member
        slots = candidates[torch.full((clusters,), candidates.numel(), device=input.device).scatter_reduce(
            0, assignment, torch.arange(candidates.numel(), device=input.device), reduce="amin")]
        order = torch.cat([keep, slots]).sort()
        return order.values, slots, weights
