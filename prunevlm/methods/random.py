"""Random baseline: k tokens drawn uniformly without replacement, from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Method, Selection, option


@dataclass
class Random(Method):
    name: ClassVar[str] = "random"
    description: ClassVar[str] = "baseline: k tokens uniformly at random (seeded; the generator advances per image)"
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)

    seed: int = option(0, "seed of the generator")
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        self.generator = torch.Generator().manual_seed(int(self.seed))

    def select(self, k, image_tokens) -> Selection:
        batch, num_tokens = image_tokens.shape[:2]
        draws = torch.stack([torch.randperm(num_tokens, generator=self.generator)[:k] for _ in range(batch)])
        return Selection(keep=draws.sort(dim=1).values.to(image_tokens.device))
