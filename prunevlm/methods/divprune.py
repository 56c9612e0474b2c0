"""DivPrune (CVPR'25, arXiv 2503.02175): keep the k most diverse projected tokens, by the greedy for the
Max-Min Diversity Problem (docs/baselines.md, DivPrune).

Distances are cosine distances 1 − cos(v_i, v_j) between the tokens the LLM receives, in fp32 from cosines
computed in fp64 and rounded to fp32, so that the picks are the same on every CPU (`portable.py`). The first
pick is the token whose nearest other token is farthest; each later pick is the token farthest from the
chosen set (its minimum distance to the chosen tokens is largest). The minimum is kept as a running
minimum, O(N) per pick, and a chosen token is never picked again, even among exact duplicates (the
official code can return a token twice; docs/baselines.md lists its deviations).

Up to `WHOLE_MATRIX_TOKENS` tokens the N x N distances are computed at once, for every image of the batch. Beyond
(a video per clip), the same distances are computed a block of rows at a time: the nearest other token from
each block, then each pick's row when it is picked (`RowCache`), so memory stays O(N · ROW_BLOCK) and the
picks are the same. A clip of more than `clip_segment` frames is chosen in two steps (`run_pool`):
each run of frames keeps CLIP_POOL times its share, then the pool keeps k (docs/baselines.md, "Clip scale").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Selection, option
from .diversity import run_pool
from .portable import WHOLE_MATRIX_TOKENS, RowCache, cosines, unit_rows

ROW_BLOCK = 256  # beyond WHOLE_MATRIX_TOKENS, rows of the distance matrix computed at once (the first pass, the cache)


def cosine_distances(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] with 1 − cos(v_i, v_j) in fp32, the cosine rounded to fp32 first (a zero token
    is at distance 1 from all)."""
    unit = unit_rows(tokens)
    return 1.0 - cosines(unit, unit)


def max_min_order(distances: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy max-min picks, [B, k] in pick order, from [B, N, N] distances (1 <= k < N).

    Ties go to the lowest index (`argmax` returns the first maximum)."""
    batch, num_tokens, _ = distances.shape
    rows = torch.arange(batch, device=distances.device)
    itself = torch.eye(num_tokens, dtype=torch.bool, device=distances.device)
    nearest_other = distances.masked_fill(itself, float("inf")).amin(dim=1)
    picks = [nearest_other.argmax(dim=1)]
    closest = distances[rows, picks[0]].clone()  # each token's distance to the chosen set, so far
    closest[rows, picks[0]] = -float("inf")
    for _ in range(1, k):
        pick = closest.argmax(dim=1)
        picks.append(pick)
        torch.minimum(closest, distances[rows, pick], out=closest)
        closest[rows, pick] = -float("inf")  # chosen: never again, whatever its distance
    return torch.stack(picks, dim=1)


def streamed_max_min_order(unit: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """`max_min_order` of one image's fp64 unit rows [N, D] without its N x N distances: the same picks, [k],
    from the same fp32 distances computed `block` rows at a time (O(N · block) memory), the nearest-other
    pass from the half of the matrix on and above its diagonal."""
    num_tokens = unit.shape[0]

    def distance_rows(ids: torch.Tensor) -> torch.Tensor:
        return 1.0 - cosines(unit[ids], unit)

    # each token's nearest other from the blocks on and right of the diagonal (the distances are symmetric)
    nearest_other = torch.full((num_tokens,), float("inf"), device=unit.device)
    for start in range(0, num_tokens, block):
        end = min(start + block, num_tokens)
        rows = 1.0 - cosines(unit[start:end], unit[start:])
        rows.diagonal().fill_(float("inf"))
        torch.minimum(nearest_other[start:end], rows.amin(dim=1), out=nearest_other[start:end])
        torch.minimum(nearest_other[start:], rows.amin(dim=0), out=nearest_other[start:])
    cache = RowCache(distance_rows, block)
    pick = int(nearest_other.argmax())
    closest = cache.row(pick, nearest_other).clone()
    closest[pick] = -float("inf")
    picks = [pick]
    for _ in range(1, k):
        pick = int(closest.argmax())
        picks.append(pick)
        torch.minimum(closest, cache.row(pick, closest), out=closest)
        closest[pick] = -float("inf")
    return torch.tensor(picks, device=unit.device)


def image_order(unit: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy picks [min(k, N)] of one image's fp64 unit rows [N, D]: all of them in order if k >= N,
    from the whole distance matrix up to WHOLE_MATRIX_TOKENS, streamed beyond."""
    num_tokens = unit.shape[0]
    if k >= num_tokens:
        return torch.arange(num_tokens, device=unit.device)
    if num_tokens <= WHOLE_MATRIX_TOKENS:
        return max_min_order((1.0 - cosines(unit, unit))[None], k)[0]
    return streamed_max_min_order(unit, k, ROW_BLOCK)


@dataclass
class DivPrune(Method):
    name: ClassVar[str] = "divprune"
    description: ClassVar[str] = (
        "text-agnostic diversity: greedy max-min cosine distance among the projected tokens (LLM input)"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)
    optional_signals: ClassVar[tuple[str, ...]] = ("frames",)

    clip_segment: int | None = option(8, "video per clip: each run of this many frames keeps 2x its share first, "
                                         "then their pool keeps k (a clip of at most this many frames, and every "
                                         "image, exactly as released); None: the exact greedy over any clip "
                                         "(docs/baselines.md, clip scale)", at_least=1)

    def select(self, k, image_tokens, frames=None) -> Selection:
        segmented = frames is not None and self.clip_segment is not None and frames[0] > self.clip_segment
        if image_tokens.shape[1] <= WHOLE_MATRIX_TOKENS and not segmented:
            order = max_min_order(cosine_distances(image_tokens), k)
        else:
            order = torch.stack([self.clip_order(unit_rows(image), k, frames if segmented else None)
                                 for image in image_tokens])
        return Selection(keep=order.sort(dim=1).values, info={"order": order})

    def clip_order(self, unit: torch.Tensor, k: int, frames: tuple | None) -> torch.Tensor:
        """One item's picks [k] from its fp64 unit rows: at once, or by runs of `clip_segment` frames then
        their pool where `frames` is given."""
        if frames is None:
            return image_order(unit, k)
        pool = run_pool(lambda positions, count: positions[image_order(unit[positions], count)], unit.shape[0], k,
                        frames, self.clip_segment, unit.device)
        return pool[image_order(unit[pool], k)]
