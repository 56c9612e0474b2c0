"""VisionZip (CVPR'25, arXiv 2412.04467): dominant tokens by vision saliency, the rest merged into a few
contextual tokens (docs/baselines.md, VisionZip).

Of the k tokens, c = round(contextual_ratio · k) are contextual (5/32 reproduces every published split:
54+10, 108+20, 162+30) and k − c dominant: the patches with the highest `saliency` (CLS→patch attention on
CLIP towers; on towers without CLS, Qwen's, the attention each token receives, the rule of the SigLIP port
docs/baselines.md cites). The R = N − (k − c) remaining tokens, in raster order, give c targets at a stride
of ⌊R / c⌋; every other remaining token joins the target most similar to it by cosine of the merge metric
(the feature layer's keys averaged over heads, `keys`; the projected tokens where no keys are given). A
target's contextual token is its own value plus the mean of its members (the official code,
`merge="target_plus_mean"`) or the average of target and members (`merge="average"`).

Contextual tokens are new tokens: they are returned in `Selection.tokens` at their targets' slots (marked in
`Selection.recycled`), so they sit at the target's position. They are merged from the projected tokens,
after the projector, where the official code merges the vision features and projects the result; and the
CLS token is not passed to the LLM (the stock model never feeds it one): k counts patches only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Selection, option
from .portable import cosines, unit_rows


def contextual_count(k: int, ratio: float) -> int:
    """c = round(ratio · k), halves rounded up, at most k."""
    return min(k, math.floor(ratio * k + 0.5))


def target_positions(remaining: int, contextual: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the remaining list of the targets, 0, t, 2t, ... with t = max(1, ⌊R / c⌋), first c, and of
    the other (member) tokens, ascending. Both follow from R and c alone: nothing is read from the device."""
    targets = torch.arange(contextual, device=device) * max(1, remaining // contextual)
    is_target = torch.zeros(remaining, dtype=torch.long, device=device).index_fill_(0, targets, 1)
    # a stable sort puts the members (0) first, in ascending order
    return targets, is_target.argsort(stable=True)[: remaining - contextual]


def rows_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] at index [B, M] -> [B, M, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def merge_contextual(values, metric, remaining, contextual: int, merge: str):
    """The targets ([B, c] token indices) and their contextual tokens [B, c, D], from the remaining tokens
    ([B, R] indices, ascending), the values [B, N, D] and the merge metric [B, N, d]."""
    at_targets, at_members = target_positions(remaining.shape[1], contextual, remaining.device)
    targets, members = remaining[:, at_targets], remaining[:, at_members]
    unit = unit_rows(metric)  # cosines in fp64 rounded to fp32, ties to the first target: the same on every CPU
    similarity = cosines(rows_at(unit, members), rows_at(unit, targets))  # [B, R - c, c]
    group = similarity.argmax(dim=-1)
    source = values.float()
    sums = torch.zeros(*targets.shape, values.shape[-1], device=values.device)
    sums.scatter_add_(1, group[..., None].expand(-1, -1, values.shape[-1]), rows_at(source, members))
    sizes = torch.zeros(targets.shape, device=values.device).scatter_add_(1, group, torch.ones_like(group, dtype=sums.dtype))
    own = rows_at(source, targets)
    if merge == "target_plus_mean":
        merged = own + sums / sizes.clamp_min(1)[..., None]
    else:
        merged = (own + sums) / (sizes + 1)[..., None]
    return targets, merged.to(values.dtype)


@dataclass
class VisionZip(Method):
    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = (
        "text-agnostic: dominant tokens by vision saliency, the rest merged by key similarity into a few "
        "contextual tokens"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "saliency")
    optional_signals: ClassVar[tuple[str, ...]] = ("keys",)

    contextual_ratio: float = option(5 / 32, "share of the k tokens that are contextual (merged): 5/32 gives the "
                                             "published 54+10, 108+20, 162+30 (docs/baselines.md)",
                                     at_least=0, at_most=1)
    merge: str = option("target_plus_mean", "contextual token: 'target_plus_mean' (official code, both ports) or "
                                            "'average' of target and members (docs/baselines.md)",
                        choices=("target_plus_mean", "average"))

    def select(self, k, image_tokens, saliency, keys=None) -> Selection:
        contextual = contextual_count(k, self.contextual_ratio)
        ranked = saliency.float().argsort(dim=1, descending=True, stable=True)
        dominant = ranked[:, : k - contextual]
        if contextual == 0:
            keep = dominant.sort(dim=1).values
            return Selection(keep=keep, scores=saliency.float(), info={"dominant": keep})
        # the other tokens in ascending order: a stable sort puts the non-dominant (0) before the dominant (1)
        is_dominant = torch.zeros_like(saliency, dtype=torch.long).scatter_(1, dominant, 1)
        remaining = is_dominant.argsort(dim=1, stable=True)[:, : image_tokens.shape[1] - dominant.shape[1]]
        metric = image_tokens if keys is None else keys
        targets, merged = merge_contextual(image_tokens, metric, remaining, contextual, self.merge)
        keep, order = torch.cat([dominant, targets], dim=1).sort(dim=1)
        tokens = rows_at(torch.cat([rows_at(image_tokens, dominant), merged], dim=1), order)
        recycled = order >= dominant.shape[1]
        return Selection(keep=keep, scores=saliency.float(), tokens=tokens, recycled=recycled,
                         info={"dominant": dominant.sort(dim=1).values, "targets": targets})
