"""Random baseline: k tokens drawn uniformly without replacement, from a seeded generator.

The draw depends only on the seed and the image's token count: the generator is re-seeded for every draw,
so every image of N tokens keeps the same k positions (the first k of one seeded permutation of N, so a
smaller budget keeps a subset of a larger one's), whether it is selected alone or in a batch, and whatever
was drawn before. The permutation is drawn on the CPU, identical on every device, and copied to the
device without a synchronisation (through pinned memory on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Method, Selection, option


@dataclass
class Random(Method):
    name: ClassVar[str] = "random"
    description: ClassVar[str] = "baseline: k tokens uniformly at random (seeded: the same draw for every image of N tokens)"
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)

    seed: int = option(0, "seed of the generator")
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        self.generator = torch.Generator().manual_seed(int(self.seed))

    def select(self, k, image_tokens) -> Selection:
        batch, num_tokens = image_tokens.shape[:2]
        draw = torch.randperm(num_tokens, generator=self.generator.manual_seed(self.seed))[:k].sort().values
        if image_tokens.device.type == "cuda":
            draw = draw.pin_memory().to(image_tokens.device, non_blocking=True)
        return Selection(keep=draw.to(image_tokens.device).expand(batch, -1).clone())
