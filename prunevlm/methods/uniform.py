"""Uniform baseline: k tokens spread evenly over the image's token grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Selection


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
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "grid")

    def select(self, k, image_tokens, grid) -> Selection:
        keep = grid_sample(int(grid[0]), int(grid[1]), k, image_tokens.device)
        return Selection(keep=keep.expand(image_tokens.shape[0], -1).clone())
