"""Uniform baseline: k tokens spread evenly over the image's token grid (or over each of its planes)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Selection
from ..errors import InvalidSignals


def grid_sample(height: int, width: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """k distinct raster indices spread evenly over a height x width grid (ascending), made on `device`.

    A sub-grid of rows x cols >= k cells with the image's aspect ratio is centred in the grid; if it holds
    more than k cells, an evenly spaced k of them (in raster order) are kept.
    """
    rows = min(height, max(1, round(math.sqrt(k * height / width))))
    cols = min(width, math.ceil(k / rows))
    rows = min(height, math.ceil(k / cols))
    ys = ((torch.arange(rows, device=device) + 0.5) * height / rows).floor().long()
    xs = ((torch.arange(cols, device=device) + 0.5) * width / cols).floor().long()
    cells = (ys[:, None] * width + xs[None, :]).flatten()
    pick = ((torch.arange(k, device=device) + 0.5) * cells.numel() / k).floor().long()
    return cells[pick]


@dataclass
class Uniform(Method):
    name: ClassVar[str] = "uniform"
    description: ClassVar[str] = "baseline: k tokens on an even spatial grid"
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)
    optional_signals: ClassVar[tuple[str, ...]] = ("grid", "planes")  # one of them: the tokens' layout

    def select(self, k, image_tokens, grid=None, planes=None) -> Selection:
        """On several planes (LLaVA-NeXT's base crop and tile plane), each gets its share of k by its size
        (largest remainders), spread evenly over it."""
        if planes is None and grid is None:
            raise InvalidSignals("uniform needs the tokens' layout: the signal grid (h, w) or planes ((h, w), ...)")
        planes = [(int(h), int(w)) for h, w in (planes or [grid])]
        keep, offset = [], 0
        for (height, width), share in zip(planes, plane_shares(k, [h * w for h, w in planes])):
            if share:
                keep.append(grid_sample(height, width, share, image_tokens.device) + offset)
            offset += height * width
        return Selection(keep=torch.cat(keep).expand(image_tokens.shape[0], -1).clone())


def plane_shares(k: int, sizes: list[int]) -> list[int]:
    """k <= sum(sizes) split over planes of these sizes in proportion to them: the floors, then one more for
    the largest remainders; among equal remainders (planes of one size: a video's frames), the extra tokens
    are spread evenly over the tied planes, the first of them first (so of two, the earlier plane), not
    given to the earliest ones. No share exceeds its plane."""
    exact = [k * size / sum(sizes) for size in sizes]
    shares = [math.floor(e) for e in exact]
    extra = k - sum(shares)
    if not extra:
        return shares
    remainder = [e - s for e, s in zip(exact, shares)]
    last = sorted(remainder, reverse=True)[extra - 1]  # the smallest remainder that gets one more
    above = [i for i, r in enumerate(remainder) if r > last]
    tied = [i for i, r in enumerate(remainder) if r == last]
    needed = extra - len(above)
    for i in above + [tied[j * len(tied) // needed] for j in range(needed)]:
        shares[i] += 1
    return shares
