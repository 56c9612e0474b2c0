"""VFlowOpt (ICCV'25, arXiv 2508.05211): importance from attention-derived context relevance and patch
entropy, stage-0 pruning with recycling, then progressive pruning at two LLM layers (docs/vflowopt.md §2–§3).

This module holds the pure parts: the importance map, the stage-0 selection with recycling, and the
per-stage token counts under the layer-averaged budget T. The in-LLM stages run in
`runtime/llm_layers.py`; the hyper-parameter search in `calibrate/`.

The importance is computed in fp64 and rounded to fp32, and so is the received attention before the
global-token threshold compares it, so that the ranking is the same on every CPU (`portable.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import Budget
from ..signals.entropy import CLIP_MEAN, CLIP_STD, CODE_CASTS, grey_levels, patch_entropy
from .base import Method, Plan, Refused, Selection, option
from ..errors import InvalidOption, InvalidSignals

# Released configurations for LLaVA-OneVision-7B (docs/vflowopt.md §3.4): T -> (r_v, r_1, r_2, t, m, alpha).
RELEASED = {
    0.10: (0.1166, 1.0, 0.6011, 39.26, 17.39, 0.0),
    0.25: (0.2651, 0.9833, 0.8773, 34.76, 15.58, 0.0),
    0.50: (0.7233, 0.7487, 0.487, 28.68, 11.76, 0.0),
}
REFERENCE_LAYERS = (9, 18, 28)  # official pruning layers k1, k2 and LLM depth (Qwen2-7B), §3.2
REFERENCE_GRID = 27  # tokens per side of the SigLIP-384/14 grid on which m is measured, §3.1


def global_weights(received: torch.Tensor, t: float) -> torch.Tensor:
    """1/|G| on the global tokens G = {g : r_g > t · mean(r)} of the received attention r [..., Q] (fp32), 0
    elsewhere (§2.1), in fp64. An empty G falls back to the token that receives the most attention, instead of
    the official NaN. The threshold is computed in fp64 and rounded to fp32 (module docstring)."""
    is_global = received > (t * received.double().mean(dim=-1, keepdim=True)).float()
    top = torch.zeros_like(is_global).scatter_(-1, received.argmax(dim=-1, keepdim=True), True)
    is_global = torch.where(is_global.any(dim=-1, keepdim=True), is_global, top)
    return is_global.double() / is_global.sum(dim=-1, keepdim=True)


def context_relevance(attention: torch.Tensor, t: float) -> torch.Tensor:
    """c_j = mean over global tokens g of A_gj, with G = {j : r_j > t · mean(r)} and r_j the mean attention
    token j receives (§2.1; mean(r) = 1/N when rows sum to 1). attention [B, N, N] -> [B, N]; in fp64, rounded
    to fp32 (module docstring)."""
    attention = attention.double()
    weights = global_weights(attention.mean(dim=1).float(), t)
    return (weights[:, :, None] * attention).sum(dim=1).float()


def crop_context_relevance(crop_attention: torch.Tensor, t: float) -> torch.Tensor:
    """c_j of §2.1 within each token's own crop, from the `crop_attention` signal [B, N, 2, Q]: row 0 the
    attention token j receives from each of the Q tokens of its crop (A_gj), row 1 the attention each of those
    receives (r_g). Equals `context_relevance` of the crop's map for every token of the crop. -> [B, N]; in
    fp64, rounded to fp32."""
    received_from, received = crop_attention.double().unbind(dim=-2)
    return (global_weights(received.float(), t) * received_from).sum(dim=-1).float()


def importance(attention: torch.Tensor, entropy: torch.Tensor, t: float, alpha: float, planes=None) -> torch.Tensor:
    """I_j = c_j + α · softmax_j(H_j) (§2.3); `attention` is the map [B, N, N], or the `crop_attention`
    signal [B, N, 2, Q] of packed multi-crop images. The official softmax runs over one crop's tokens; with
    several `planes` (base crop, tile plane) it runs over each plane, scaled by the plane's size in base
    crops, so that each crop's worth of entropy term sums to 1 like its context relevance (docs/vflowopt.md §5).
    Computed in fp64, returned in fp32 (module docstring)."""
    relevance = context_relevance(attention, t) if attention.dim() == 3 else crop_context_relevance(attention, t)
    if planes is None or len(planes) == 1:
        return (relevance.double() + alpha * torch.softmax(entropy.double(), dim=-1)).float()
    sizes = [h * w for h, w in planes]
    parts = entropy.double().split(sizes, dim=-1)
    spread = [torch.softmax(part, dim=-1) * (size / sizes[0]) for part, size in zip(parts, sizes)]
    return (relevance.double() + alpha * torch.cat(spread, dim=-1)).float()


def plane_cells(planes, cell: float, device) -> tuple[torch.Tensor, int]:
    """Per token, its square cell of side `cell` tokens on its own plane ((h, w), ... row-major one after the
    other), numbered across planes, so that no cell spans two planes; and the number of cells."""
    cells, offset = [], 0
    for rows, cols in planes:
        index = torch.arange(rows * cols, device=device)
        per_row = math.ceil(cols / cell)
        cells.append(offset + ((index // cols) / cell).floor().long() * per_row + ((index % cols) / cell).floor().long())
        offset += math.ceil(rows / cell) * per_row
    return torch.cat(cells), offset


def recycle(scores: torch.Tensor, tokens: torch.Tensor, planes, count: int, cell: float):
    """Stage 0 for a batch of images: keep `count` tokens in all per image, recycled ones included (§3.1,
    with exact counts). scores [B, N], tokens [B, N, D], `planes` the tokens' row-major planes.

    The lowest-importance tokens (ranked over all planes, as the official ranks base and tile tokens
    together) are pruned and binned, plane by plane, on square cells of side `cell` tokens; each occupied
    cell becomes one token: the importance-weighted mean of its members, at the slot
    of its most important member, carrying that member's importance. The number of kept originals is the
    smallest one for which kept + occupied cells reaches count (kept + cells grows by 0 or 1 per token
    kept, so it reaches count exactly). A larger one can give the same total only by emptying one-member
    cells, whose recycled token is that member itself: the tokens are the same, only `is_recycled` differs.
    If even no original leaves too many cells, the `count` most important cells are kept.

    Every image is handled at once and on its device, in shapes fixed by N, the planes and count: a cell's
    members are pruned from rank p on exactly when p <= the rank of its last member, so the occupied count
    for every number of kept originals is one suffix sum, and the cells' sums run over all N tokens with
    the kept ones weighted out (adding in ranked order, so the sums equal those over the pruned alone).
    Returns (keep [B, count] ascending, values [B, count, D], importance [B, count], is_recycled [B, count]).
    """
    batch, num_tokens = scores.shape
    device = scores.device
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    index = torch.arange(num_tokens, device=device)
    cell_of, num_cells = plane_cells(planes, cell, device)
    cell_ranked = cell_of[ranked]  # [B, N]: the cell of each token in ranked order
    last = torch.full((batch, num_cells), -1, device=device).scatter_reduce_(
        1, cell_ranked, index.expand(batch, -1), reduce="amax")
    # occupied(kept) = #cells whose last member's rank is >= kept: a suffix sum of the last ranks' histogram
    hist = torch.zeros(batch, num_tokens + 1, dtype=torch.long, device=device).scatter_add_(
        1, last.clamp_min(0), (last >= 0).long())
    occupied = hist.flip(1).cumsum(1).flip(1)[:, : count + 1]
    kept = (torch.arange(count + 1, device=device) + occupied >= count).long().argmax(dim=1, keepdim=True)  # [B, 1]
    pruned = index >= kept  # [B, N] in ranked order
    ranked_scores = scores.gather(1, ranked)
    ranked_tokens = tokens.gather(1, ranked[..., None].expand(-1, -1, tokens.shape[-1]))
    flat_cells = (cell_ranked + num_cells * torch.arange(batch, device=device)[:, None]).flatten()

    def per_cell(values: torch.Tensor) -> torch.Tensor:  # sums over each cell's pruned members, in ranked order
        out = torch.zeros(batch * num_cells, *values.shape[2:], dtype=values.dtype, device=device)
        return out.index_add_(0, flat_cells, values.flatten(0, 1)).view(batch, num_cells, *values.shape[2:])

    weights = torch.where(pruned, ranked_scores.float().clamp_min(0), 0.0)  # the official weights are I itself
    total = per_cell(weights)
    weights = torch.where(pruned & (total.gather(1, cell_ranked) <= 0), 1.0, weights)  # vanishing: uniform mean
    total = per_cell(weights)
    summed = per_cell(ranked_tokens.float() * weights[..., None])
    size = per_cell(pruned.float())
    # ranked order is descending importance, so a cell's first pruned member is its most important one
    first = torch.full((batch, num_cells), num_tokens, device=device).scatter_reduce_(
        1, cell_ranked, torch.where(pruned, index, num_tokens), reduce="amin")
    occupied_cell = first < num_tokens
    first = first.clamp_max(num_tokens - 1)
    slots = ranked.gather(1, first)
    slot_tokens = ranked_tokens.gather(1, first[..., None].expand(-1, -1, tokens.shape[-1]))
    cell_values = torch.where(size[..., None] == 1, slot_tokens, (summed / total[..., None]).to(tokens.dtype))
    cell_importance = ranked_scores.gather(1, first)
    # occupied cells by importance (ties by cell), then the empty ones; kept + occupied >= count, so the
    # first count - kept of them are occupied: all of them, or the best `count` when kept is 0
    best = torch.where(occupied_cell, cell_importance, -math.inf).argsort(dim=1, descending=True, stable=True)
    position = torch.arange(count, device=device).expand(batch, -1)
    is_recycled = position >= kept
    pick = best.gather(1, (position - kept).clamp(0, num_cells - 1))
    original = position.clamp_max(num_tokens - 1)
    keep = torch.where(is_recycled, slots.gather(1, pick), ranked.gather(1, original))
    values = torch.where(is_recycled[..., None], cell_values.gather(1, pick[..., None].expand(-1, -1, tokens.shape[-1])),
                         ranked_tokens.gather(1, original[..., None].expand(-1, -1, tokens.shape[-1])))
    weights_out = torch.where(is_recycled, cell_importance.gather(1, pick), ranked_scores.gather(1, original))
    order = keep.argsort(dim=1)
    return (keep.gather(1, order), values.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1])),
            weights_out.gather(1, order), is_recycled.gather(1, order))


def r_2_for_budget(fraction: float, r_v: float, r_1: float, layers: tuple[int, int], depth: int) -> float:
    """r_2 that meets T: solves T·L = k1·r_v + (k2 − k1)·r_v·r_1 + (L − k2)·r_v·r_1·r_2 for r_2 (L > k2)."""
    k1, k2 = layers
    return (fraction * depth - k1 * r_v - (k2 - k1) * r_v * r_1) / ((depth - k2) * r_v * r_1)


def r_1_for_budget(fraction: float, r_v: float, r_2: float, layers: tuple[int, int], depth: int) -> float:
    """r_1 that meets T for a given r_2: the same equation solved for r_1."""
    k1, k2 = layers
    return (depth * fraction / r_v - k1) / (k2 - k1 + (depth - k2) * r_2)


def default_layers(num_layers: int) -> tuple[int, int]:
    """The official layers 9 and 18 of 28, scaled to the LLM's depth."""
    k1 = min(num_layers - 1, max(1, round(REFERENCE_LAYERS[0] * num_layers / REFERENCE_LAYERS[2])))
    k2 = min(num_layers - 1, max(k1, round(REFERENCE_LAYERS[1] * num_layers / REFERENCE_LAYERS[2])))
    return k1, k2


def nearest_released(fraction: float) -> tuple:
    return RELEASED[min(RELEASED, key=lambda t: abs(t - fraction))]


@dataclass
class VFlowOpt(Method):
    name: ClassVar[str] = "vflowopt"
    description: ClassVar[str] = (
        "importance = attention-derived context relevance + patch entropy; stage-0 pruning with recycling, "
        "then progressive pruning at two LLM layers; budget = layer-averaged visual tokens"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "patches")
    # one of attention (a map per image) and crop_attention (per token within its crop, for packed multi-crop
    # images), and one of grid and planes (the tokens' layout)
    optional_signals: ClassVar[tuple[str, ...]] = ("attention", "crop_attention", "grid", "planes")
    prunes_in_llm: ClassVar[bool] = True

    r_v: float | None = option(None, "kept fraction at the LLM input; None: the released schedule nearest T, "
                                     "rescaled (docs/vflowopt.md §3.3)", above=0, at_most=1, calibrated=True)
    r_1: float | None = option(None, "kept fraction of the remaining tokens at layer k1; None: the released "
                                     "schedule's", above=0, at_most=1, calibrated=True)
    t: float = option(39.26, "global-token threshold, in units of the mean received attention (released 10 % "
                             "config, §2.1)", at_least=0, calibrated=True)
    m: float = option(17.39, "recycling cell side, on the 27-token reference grid (released 10 % config, §3.1)",
                      above=0, calibrated=True)
    alpha: float = option(0.0, "entropy weight (the search spans [-1, 1], §4); 0 in every released config (§2.3)",
                          calibrated=True)
    layers: tuple[int, int] | None = option(None, "(k1, k2), the LLM layers of stages 1 and 2; None: 9/28 and "
                                                  "18/28 of the LLM depth (§3.2)")
    recycle: bool = option(True, "aggregate the pruned tokens per cell at stage 0 (§3.1)")
    entropy: str = option("paper", "'paper': raw 0-255 grey levels; 'code': the official uint8 cast "
                                   "(docs/methods.md)", choices=("paper", "code"))
    code_cast: str = option("wrap", "how 'code' reads that cast: 'wrap' (mod 256, PyTorch CPU) or 'saturate' "
                                    "(docs/methods.md)", choices=CODE_CASTS)
    pixel_mean: tuple[float, float, float] = option(CLIP_MEAN, "the processor's normalisation mean, undone for "
                                                               "the entropy's grey levels")
    pixel_std: tuple[float, float, float] = option(CLIP_STD, "the processor's normalisation std (each > 0)")

    def __post_init__(self):
        super().__post_init__()
        if min(self.pixel_std) <= 0:
            raise InvalidOption(f"vflowopt: option pixel_std must be > 0 per channel, got {self.pixel_std}")
        if self.layers is not None and not 1 <= self.layers[0] <= self.layers[1]:
            raise InvalidOption(f"vflowopt: option layers must be (k1, k2) with 1 <= k1 <= k2, got {self.layers}")

    def rates(self, fraction: float, layers: tuple[int, int], num_layers: int) -> tuple[float, float]:
        """(r_v, r_1) at T = `fraction`: the options', or where unset the released schedule nearest T (§3.3)."""
        (k1, k2), r_v, r_1 = layers, self.r_v, self.r_1
        if r_v is None or r_1 is None:
            _, released_r_1, released_r_2 = nearest_released(fraction)[:3]
            r_1 = released_r_1 if r_1 is None else r_1
            if r_v is None:
                r_v = min(1.0, fraction * num_layers / (k1 + (k2 - k1) * r_1 + (num_layers - k2) * r_1 * released_r_2))
        if num_layers > k2 and self.r_1 is None and r_2_for_budget(fraction, r_v, r_1, layers, num_layers) > 1:
            # T above what the released schedule keeps even with r_v = 1 (the released configs stop at
            # T = 0.5): keep every token from k2 on and raise r_1 to meet T instead
            r_1 = min(1.0, r_1_for_budget(fraction, r_v, 1.0, layers, num_layers))
        return r_v, r_1

    def plan(self, budget: Budget, num_tokens: int, num_layers: int) -> Plan:
        """Stage counts for one image of `num_tokens` tokens: budget is T, the layer-averaged fraction or
        count of visual tokens. r_2 is derived from T (§3.3); counts are rounded so that the
        layer average is as close to T as integers allow."""
        fraction = budget.fraction_of(num_tokens)
        k1, k2 = self.layers or default_layers(num_layers)
        if k2 >= num_layers:
            raise Refused(f"vflowopt: layers {(k1, k2)} must lie below the LLM depth {num_layers}")
        if fraction >= 1.0:
            return Plan((num_tokens,) * 3, (k1, k2), num_layers)
        r_v, r_1 = self.rates(fraction, (k1, k2), num_layers)
        if num_layers > k2:  # r_2 from T (§3.3), before rounding to token counts
            r_2 = r_2_for_budget(fraction, r_v, r_1, (k1, k2), num_layers)
            if not 0 < r_2 <= 1 + 1e-9:
                raise Refused(
                    f"vflowopt: r_v={r_v:.4f}, r_1={r_1:.4f} cannot meet T={fraction:.4f} (it would need r_2={r_2:.3f}); "
                    f"use a config calibrated for this budget or leave r_v/r_1 unset"
                )
        n0 = max(1, round(r_v * num_tokens))
        n1 = max(1, round(r_1 * n0))
        # n2 makes the layer average as close to T as integer counts allow
        remaining = fraction * num_layers * num_tokens - k1 * n0 - (k2 - k1) * n1
        n2 = n1 if num_layers == k2 else min(n1, max(1, round(remaining / (num_layers - k2))))
        return Plan((n0, n1, n2), (k1, k2), num_layers)

    def scores(self, attention: torch.Tensor, patches: torch.Tensor, planes=None) -> torch.Tensor:
        entropy = patch_entropy(grey_levels(patches, self.pixel_mean, self.pixel_std, self.entropy, self.code_cast))
        return importance(attention, entropy, self.t, self.alpha, planes)

    def importance_of(self, patches, attention=None, crop_attention=None, planes=None) -> torch.Tensor:
        if (attention is None) == (crop_attention is None):
            raise InvalidSignals("vflowopt needs exactly one of the signals attention (the image's vision attention map) "
                            "and crop_attention (packed multi-crop images); got "
                            f"{'both' if attention is not None else 'neither'}")
        return self.scores(crop_attention if attention is None else attention, patches, planes)

    @staticmethod
    def layout(grid, planes) -> tuple[tuple[int, int], ...]:
        if planes is None and grid is None:
            raise InvalidSignals("vflowopt needs the tokens' layout: the signal grid (h, w) or planes ((h, w), ...)")
        return tuple((int(h), int(w)) for h, w in (planes or [grid]))

    def keep_all(self, batch, num_tokens, image_tokens, patches, grid=None, planes=None, **attention) -> Selection:
        scores = self.importance_of(patches, planes=self.layout(grid, planes), **attention)
        keep = torch.arange(num_tokens, device=scores.device).expand(batch, -1).clone()
        return Selection(keep=keep, scores=scores, importance=scores)

    def select(self, k, image_tokens, patches, grid=None, planes=None, **attention) -> Selection:
        """Stage 0: k tokens reach the LLM (recycled ones included), with their importance for later stages.
        Recycling cells are m tokens of the 27-token reference crop, scaled to the first plane's side (a
        crop's side on LLaVA-NeXT/OneVision, so m itself on OneVision)."""
        planes = self.layout(grid, planes)
        scores = self.importance_of(patches, planes=planes, **attention)
        if not self.recycle:
            keep = scores.argsort(dim=-1, descending=True, stable=True)[:, :k].sort(dim=-1).values
            return Selection(keep=keep, scores=scores, importance=scores.gather(1, keep))
        cell = self.m * math.sqrt(planes[0][0] * planes[0][1]) / REFERENCE_GRID
        keep, values, weights, recycled = recycle(scores, image_tokens, planes, k, cell)
        return Selection(keep=keep, scores=scores, tokens=values, importance=weights, recycled=recycled)
