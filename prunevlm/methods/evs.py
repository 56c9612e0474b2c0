"""EVS: vLLM's efficient video sampling, the serving engine's own video pruning, as a baseline
(docs/baselines.md, EVS).

Each token of a frame is scored by how much it changed since the previous frame: its dissimilarity is
1 − cos to the token at the same position in the previous frame, over the projected tokens the LLM
receives (`image_tokens`, as vLLM scores the vision tower's output after its merger). The first frame has
nothing to compare with and ranks above every other token, so it is kept whole whenever the budget allows.

- `video_scope="per_clip"` (`select`): the clip's k most changed tokens, frame 1 first.
- `video_scope="per_frame"` (`select_frames`, called once on the whole clip): each frame keeps its own k
  most changed tokens, frame 1 keeps k.
- Frame 1 under a budget below its size (per clip: k < h·w; per frame: always unless k = h·w): its k
  tokens spread evenly over its grid (uniform's sample), where vLLM never goes (it floors its count at one
  whole frame).

Same result on every CPU (docs/diversity.md, methods/portable.py): the cosines are computed in fp64 and rounded to fp32 before
they are compared; the ranking is a stable sort of the rounded cosine (ascending), so exact ties go to the
earlier frame, then the earlier position in raster order, as in vLLM's stable sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import Budget
from .base import Method, Refused, Selection
from .portable import unit_rows
from .uniform import grid_sample
from ..errors import InvalidSignals


def frame_cosines(image_tokens: torch.Tensor, frames: tuple[int, int, int]) -> torch.Tensor:
    """[B, t, h·w] cosine of each token to the same position in the previous frame (fp64, rounded to fp32);
    −inf for frame 1, which has no previous frame and ranks first."""
    batch, _, width = image_tokens.shape
    count, height, columns = frames
    unit = unit_rows(image_tokens.detach()).view(batch, count, height * columns, width)
    first = torch.full((batch, 1, height * columns), -torch.inf, device=image_tokens.device)
    return torch.cat([first, (unit[:, 1:] * unit[:, :-1]).sum(dim=-1).float()], dim=1)


@dataclass
class EVS(Method):
    name: ClassVar[str] = "evs"
    description: ClassVar[str] = (
        "video baseline, vLLM's efficient video sampling: the tokens that changed most since the previous frame "
        "(cosine to the same position), frame 1 whole; videos only"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "frames")
    whole_clip: ClassVar[bool] = True

    def check_signals(self, signals: dict) -> tuple[int, int]:
        """Refuse an image (no `frames`) and a `frames` that does not hold the N tokens, then the base checks."""
        frames = signals.get("frames")
        if frames is None:
            raise Refused("evs is a video method: it compares each frame with the previous one, and an image has no "
                          "frames; prune images with another method (prunevlm methods lists them)")
        if len(frames) != 3 or not all(isinstance(n, int) and n > 0 for n in frames):
            raise InvalidSignals(f"frames must be (t, h, w), three positive ints, got {frames!r}")
        batch, num_tokens = super().check_signals(signals)
        if frames[0] * frames[1] * frames[2] != num_tokens:
            raise InvalidSignals(f"frames {tuple(frames)} hold {frames[0] * frames[1] * frames[2]} tokens but the signals "
                             f"have N={num_tokens}")
        return batch, num_tokens

    def select(self, k, image_tokens, frames) -> Selection:
        """video_scope="per_clip": the k tokens of the clip that changed most, frame 1 first."""
        cosine = frame_cosines(image_tokens, frames)
        batch, size = image_tokens.shape[0], frames[1] * frames[2]
        if k <= size:
            keep = grid_sample(frames[1], frames[2], k, image_tokens.device).expand(batch, -1)
        else:
            keep = cosine.flatten(1).argsort(dim=1, stable=True)[:, :k]
        return Selection(keep=keep.sort(dim=1).values, scores=1 - cosine.flatten(1))

    def select_frames(self, budget: Budget, **signals) -> Selection:
        """video_scope="per_frame", on the whole clip: every frame keeps budget.tokens_to_keep(h·w) tokens, its
        most changed ones (frame 1 whole, or its share spread evenly over its grid)."""
        batch, num_tokens = self.check_signals(signals)
        image_tokens, (count, height, columns) = signals["image_tokens"], signals["frames"]
        k = budget.tokens_to_keep(height * columns)
        if k == height * columns:
            return self.keep_all(batch, num_tokens, **signals)
        cosine = frame_cosines(image_tokens, signals["frames"])
        later = cosine[:, 1:].argsort(dim=2, stable=True)[..., :k]
        later = later + height * columns * torch.arange(1, count, device=later.device)[:, None]
        first = grid_sample(height, columns, k, image_tokens.device).expand(batch, -1)
        keep = torch.cat([first, later.flatten(1)], dim=1).sort(dim=1).values
        return Selection(keep=keep, scores=1 - cosine.flatten(1))
