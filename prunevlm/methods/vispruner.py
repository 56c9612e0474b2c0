"""VisPruner (ICCV'25): important tokens by vision saliency, the rest by de-duplication.

The important share is the top of `saliency.float()` and the residual is de-duplicated in descending order
of it. FlashVLM ranks its rows without text by this same score, so on those rows it selects exactly these
indices (docs/methods.md, FlashVLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Selection
from .diversity import ImportantDiverse


@dataclass
class VisPruner(ImportantDiverse):
    name: ClassVar[str] = "vispruner"
    description: ClassVar[str] = "text-agnostic: half the budget by vision saliency, half by a diversity-preserving partition"
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "saliency")
    optional_signals: ClassVar[tuple[str, ...]] = ("features", "frames")

    def select(self, k, image_tokens, saliency, features=None, frames=None) -> Selection:
        return self.split(saliency.float(), image_tokens if features is None else features, k, frames)
