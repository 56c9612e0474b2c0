"""What the method chose for one image of a prefill, and what becomes of its non-candidate placeholders
(docs/models.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..methods.base import Plan, Selection

# what becomes of placeholders that are no candidates (LLaVA-NeXT/OneVision newlines): ImageChoice
NEWLINE_POLICIES = ("drop", "keep_nonempty_rows", "keep_all")


@dataclass
class ImageChoice:
    """What the method chose for one image of the batch: row `index` of its group's selection.

    Where the adapter marks some placeholders as no candidates (LLaVA-NeXT/OneVision newlines), the method
    chose among `candidates` only, and the others are kept by the `newline` policy: "drop" none, "keep_all"
    every one, "keep_nonempty_rows" those whose row (`rows`) kept a token; an image kept whole keeps all.
    """

    row: int
    columns: torch.Tensor  # the image's columns in the unpruned sequence
    selection: Selection  # the selection of the image's group (images of one token count, selected at once)
    index: int
    plan: Plan
    candidates: torch.Tensor | None = None  # indices within the image the method chose from; None: all
    rows: torch.Tensor | None = None  # per placeholder, the row whose newline ends it
    newline: str = "drop"
    frames: tuple[int, int, int] | None = None  # a video's (t, h, w) frames of content tokens; None: an image

    @cached_property
    def keep(self) -> torch.Tensor:
        """Kept candidate indices within the image, ascending (aligned with `tokens` and `importance`)."""
        keep = self.selection.keep[self.index]
        return keep if self.candidates is None else self.candidates[keep]

    @cached_property
    def newlines(self) -> torch.Tensor:
        """Kept placeholders that were no candidates, indices within the image, ascending."""
        if self.candidates is None:
            return self.keep[:0]
        others = torch.ones(self.columns.numel(), dtype=torch.bool, device=self.columns.device)
        others[self.candidates] = False
        others = torch.nonzero(others).flatten()
        if self.newline == "keep_all" or self.plan.counts[0] >= self.columns.numel():
            return others
        if self.newline == "drop":
            return others[:0]
        return others[torch.isin(self.rows[others], self.rows[self.keep])]

    @cached_property
    def placeholders(self) -> torch.Tensor:
        """Every kept placeholder of the image (content and newlines), indices within the image, ascending."""
        return torch.cat([self.keep, self.newlines]).sort().values

    @cached_property
    def chosen(self) -> torch.Tensor:
        """The kept columns in the unpruned sequence (read several times per prefill, computed once)."""
        return self.columns[self.keep]

    @property
    def tokens(self) -> torch.Tensor | None:
        """Values for the kept slots instead of the originals (recycled tokens), or None."""
        return None if self.selection.tokens is None else self.selection.tokens[self.index]

    @property
    def importance(self) -> torch.Tensor | None:
        return None if self.selection.importance is None else self.selection.importance[self.index]

    @property
    def recycled(self) -> torch.Tensor:
        """Kept indices (within the image) whose slot holds a recycled token."""
        return self.keep[:0] if self.selection.recycled is None else self.keep[self.selection.recycled[self.index]]
