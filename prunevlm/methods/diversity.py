"""Diversity-preserving partition: VisPruner's iterative bipartite de-duplication (docs/flashvlm.md §7).

The residual R (tokens not chosen as important, in descending score order) is shrunk to `keep` tokens:
split R by position into A (even) and B (odd), score each a in A by m(a) = max_b cos(a, b), drop the r
most redundant A-tokens, and continue with [kept A sorted by m descending] + [B].

The released loop recomputes an |A|x|B| product every round: Θ(N³d/r) for its fixed r = 8 (docs/flashvlm.md
§7: 11 s at N = 4608). The rounds here are exactly the released ones, with m(a) found more cheaply:
- up to `DENSE_TOKENS` tokens, from the N x N cosine matrix computed once (about 3N²d/4 multiply-adds
  instead of ~6N²d): cosine is symmetric, so m over A is a column-wise max over B's rows;
- beyond, from per-token nearest-neighbour lists (built from the half of the cosine matrix on and above
  its diagonal): m(a) is the similarity of a's nearest neighbour that sits in B, looked for in the head
  of the list first. Dropped tokens never come back, so a list is rebuilt (against the live tokens) only
  when none of its entries sits in B, together with the lists that are more than half dead.
Up to `DENSE_TOKENS` tokens, and on any device other than the CPU at any size, m comes from the residual's
cosine matrix, computed once for the whole batch. On a GPU the rounds then run in torch for all images at
once (`device_rounds`): each round is a fixed sequence of batched gathers, a reduction and a sort whose
shapes depend only on R, `keep` and the schedule (the same for every image), so all images advance
together and nothing is read back to the host (no synchronisation on CUDA). On the CPU the same rounds run
image by image in NumPy (`host_rounds`), where a round's few small operations cost about a microsecond
each instead of several: measured in one run on this 2-core CPU at N = 576 -> 32 (the rounds alone),
2.6 against 4.1 ms for one image and 38 against 71 ms for 16 (one thread; with two threads the gap is
wider). Both give the same positions (tests/test_batched.py). Beyond `DENSE_TOKENS` on the CPU, the
nearest-neighbour lists decide on the host which lists to rebuild, image by image: there the whole matrix
and its rounds cost far more (at N = 4608, 85 MB per image and 576 rounds).
`schedule="geometric"` drops a fixed fraction of R per round instead, O(log(N/k)) rounds; its coverage
against the fixed schedule is measured by benchmarks/diversity.py.

At clip scale, `window` (the methods' `dedup_window`) restricts m(a) to the B-tokens at most that many
frames from a (`frame`: each token's frame): the cosine matrix is then masked beyond the window, and the
neighbour lists are built from the blocks of the frame-sorted residual that lie within it, so their cost
grows with N, not N²; a GPU takes the lists too beyond DENSE_TOKENS (docs/diversity.md, "Clip scale").

Every path compares the same numbers: cosines of fp64 unit vectors rounded to fp32 (`portable.py`), so
their order does not depend on the CPU's kernels or threads, and ties among A go by A's order (a stable
sort), as in the released loop (docs/diversity.md, "Same result on every CPU").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .base import Method, Selection, option
from .portable import cosines, unit_rows

DENSE_TOKENS = 2048  # up to this many tokens the whole cosine matrix is kept (16 MB in fp32)
NEIGHBOURS = 64  # length of the nearest-neighbour lists; a speed knob only, results do not depend on it
LIST_HEAD = 8  # list entries read first each round, the rest only where none is in B; a speed knob too
CHUNK_ROWS = 1024  # side of the blocks of the cosine matrix computed at once for the lists, and rows per rebuild


def drops_per_round(residual: int, keep: int, step: int, schedule: str, ratio: float) -> int:
    """How many A-tokens one round drops (never more than |A|, never past `keep`)."""
    if schedule == "fixed":
        r = step
    elif schedule == "geometric":
        r = max(step, math.ceil(ratio * residual))
    else:
        raise ValueError(f"unknown dedup schedule {schedule!r}; use 'fixed' or 'geometric'")
    return min(r, residual - keep, (residual + 1) // 2)


def bipartite_dedup(
    features: torch.Tensor,
    order: torch.Tensor,
    keep: int,
    step: int = 8,
    schedule: str = "fixed",
    ratio: float = 0.1,
    stats: dict | None = None,
    frame: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Shrink the residual `order` ([B, R] token indices into `features` [B, N, D]) to `keep` tokens.

    Returns [B, keep] token indices (in the final round's order, not sorted). `stats`, if given, receives
    the number of rounds, which is the same for every image: it depends only on R, `keep` and the schedule.
    With `frame` ([N], each token's frame) and `window`, a token's redundancy counts only the B-tokens at
    most `window` frames away.
    """
    residual = order.shape[1]
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    if step < 1:
        raise ValueError(f"dedup step must be >= 1, got {step}")
    if keep >= residual:
        return order
    if keep == 0:
        return order[:, :0]
    chosen = features.gather(1, order[..., None].expand(-1, -1, features.shape[-1]))
    unit = unit_rows(chosen.detach())
    near = None if frame is None or window is None else frame.to(order.device)[order]  # [B, R] frames
    if residual <= DENSE_TOKENS or (features.device.type != "cpu" and near is None):
        similarity = symmetric_gram(unit)
        if near is not None:
            similarity.masked_fill_((near[:, :, None] - near[:, None, :]).abs() > window, -math.inf)
        positions = dense_rounds(similarity, keep, step, schedule, ratio)
    else:
        positions = torch.stack([list_rounds(image, keep, step, schedule, ratio, None if near is None else near[i], window)
                                 for i, image in enumerate(unit)])
    if stats is not None:
        stats["rounds"] = count_rounds(residual, keep, step, schedule, ratio)
    return order.gather(1, positions)


def count_rounds(residual: int, keep: int, step: int, schedule: str, ratio: float) -> int:
    """The number of rounds from R down to `keep`: the same for every image."""
    rounds = 0
    while residual > keep:
        residual -= drops_per_round(residual, keep, step, schedule, ratio)
        rounds += 1
    return rounds


def dense_rounds(similarity: torch.Tensor, keep: int, step: int, schedule: str, ratio: float) -> torch.Tensor:
    """The rounds for a batch from its cosine matrices [B, R, R]: [B, keep] positions in 0..R-1, on the host
    on the CPU and on the device elsewhere (module docstring)."""
    if similarity.device.type == "cpu":
        return torch.stack([torch.from_numpy(host_rounds(matrix.numpy(), keep, step, schedule, ratio))
                            for matrix in similarity])
    return device_rounds(similarity, keep, step, schedule, ratio)


def host_rounds(similarity: np.ndarray, keep: int, step: int, schedule: str, ratio: float) -> np.ndarray:
    """The rounds for one image in NumPy: m over A is a column-wise max over B's rows (cosine is symmetric)."""
    current = np.arange(similarity.shape[0])
    while current.size > keep:
        r = drops_per_round(current.size, keep, step, schedule, ratio)
        side_a, side_b = current[0::2], current[1::2]
        # descending by m, ties in A's order (as a stable descending sort): negation is exact
        ranked = np.argsort(-similarity[side_b].max(axis=0)[side_a], kind="stable")
        current = np.concatenate([side_a[ranked[r:]], side_b])
    return current


def device_rounds(similarity: torch.Tensor, keep: int, step: int, schedule: str, ratio: float) -> torch.Tensor:
    """The rounds for the whole batch at once in torch, nothing read back: B's rows are gathered from the
    flattened batch (one contiguous copy per row), reduced over rows, then read at A's columns."""
    batch, residual = similarity.shape[:2]
    rows = similarity.reshape(batch * residual, residual)
    offsets = torch.arange(batch, device=similarity.device)[:, None] * residual
    current = torch.arange(residual, device=similarity.device).expand(batch, -1)
    while current.shape[1] > keep:
        r = drops_per_round(current.shape[1], keep, step, schedule, ratio)
        side_a, side_b = current[:, 0::2], current[:, 1::2]
        nearest = rows.index_select(0, (side_b + offsets).flatten()).view(batch, -1, residual).amax(dim=1)
        # descending by m, ties in A's order: a stable descending sort
        ranked = nearest.gather(1, side_a).argsort(dim=1, descending=True, stable=True)
        current = torch.cat([side_a.gather(1, ranked[:, r:]), side_b], dim=1)
    return current


def list_rounds(unit: torch.Tensor, keep: int, step: int, schedule: str, ratio: float,
                near: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """The rounds for one image [R, D] from nearest-neighbour lists (R > DENSE_TOKENS; on the CPU, or within a
    window of frames, `near` [R] each token's frame): [keep] positions."""
    scorer = ListRedundancy(unit, near, window)
    current = np.arange(unit.shape[0])
    while current.size > keep:
        r = drops_per_round(current.size, keep, step, schedule, ratio)
        side_a, side_b = current[0::2], current[1::2]
        # descending by m, ties in A's order (as a stable descending sort): negation is exact
        ranked = np.argsort(-scorer.redundancy(side_a, side_b), kind="stable")
        scorer.drop(side_a[ranked[:r]])
        current = np.concatenate([side_a[ranked[r:]], side_b])
    return torch.from_numpy(current).to(unit.device)


def symmetric_gram(unit: torch.Tensor) -> torch.Tensor:
    """The cosines of fp64 unit rows ([R, D] or a batch [B, R, D]) with each other, rounded to fp32, from three
    of the four blocks of unit @ unitᵀ (the lower-left one is the upper-right one transposed): a quarter fewer
    multiply-adds, and exactly symmetric."""
    half = unit.shape[-2] // 2
    gram = torch.empty(*unit.shape[:-1], unit.shape[-2], dtype=torch.float32, device=unit.device)
    gram[..., :half, :] = cosines(unit[..., :half, :], unit)
    gram[..., half:, half:] = cosines(unit[..., half:, :], unit[..., half:, :])
    gram[..., half:, :half] = gram[..., :half, half:].transpose(-1, -2)
    return gram


def nearest_neighbours(unit: torch.Tensor, width: int, near: torch.Tensor | None = None,
                       window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's `width` most similar other tokens, (similarity, index) sorted descending; `unit` are fp64
    unit rows and the similarities their cosines rounded to fp32. With `near` ([R], each token's frame) and
    `window`, only tokens at most `window` frames away count; a list with fewer is padded with -inf.

    The cosine matrix is computed in CHUNK_ROWS blocks, only those on or above the diagonal: block (i, j)
    gives candidates to the rows of chunk i, and transposed to those of chunk j (cosine is symmetric), so
    about half the products of the full matrix are computed. Within a window the tokens are first sorted by
    frame, so a chunk's blocks end where the window does. Each row keeps its best `width` candidates."""
    if near is None:
        return _blocks_neighbours(unit, width)
    by_frame = near.argsort(stable=True)
    similarity, neighbours = _blocks_neighbours(unit[by_frame], width, near[by_frame], window)
    unsorted = torch.empty_like(by_frame).scatter_(0, by_frame, torch.arange(by_frame.numel(), device=by_frame.device))
    return similarity[unsorted], by_frame[neighbours[unsorted]]


def _blocks_neighbours(unit: torch.Tensor, width: int, near: torch.Tensor | None = None,
                       window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_neighbours` from the blocks on and above the diagonal, `near` (if given) ascending."""
    count = unit.shape[0]
    starts = list(range(0, count, CHUNK_ROWS))
    candidates: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in starts]
    for i, row_start in enumerate(starts):
        rows = unit[row_start : row_start + CHUNK_ROWS]
        for j in range(i, len(starts)):
            column_start = starts[j]
            if window is not None and near[column_start] - near[min(row_start + CHUNK_ROWS, count) - 1] > window:
                break  # sorted by frame: this block and every later one lie beyond the window
            block = cosines(rows, unit[column_start : column_start + CHUNK_ROWS])
            if window is not None:
                frames = near[row_start : row_start + CHUNK_ROWS]
                block.masked_fill_((frames[:, None] - near[column_start : column_start + CHUNK_ROWS]).abs() > window,
                                   -math.inf)
            views = [(i, column_start, block)]
            if i == j:
                block.fill_diagonal_(-math.inf)  # not itself
            else:
                views.append((j, row_start, block.T))
            for owner, offset, sims in views:
                values, index = sims.topk(min(width, sims.shape[1]), dim=1)
                candidates[owner].append((values, index + offset))
    similarity, neighbours = [], []
    for chunk in candidates:
        values, index = torch.cat([v for v, _ in chunk], dim=1), torch.cat([n for _, n in chunk], dim=1)
        short = width - values.shape[1]  # within a window a chunk may see fewer candidates than `width`
        if short > 0:
            values = F.pad(values, (0, short), value=-math.inf)
            index = F.pad(index, (0, short))
        best, position = values.topk(width, dim=1)
        similarity.append(best)
        neighbours.append(index.gather(1, position))
    return torch.cat(similarity), torch.cat(neighbours)


class ListRedundancy:
    """m(a) from nearest-neighbour lists (sorted, descending), rebuilt against the live tokens when exhausted;
    `unit` are fp64 unit rows.

    The lists stay on the features' device in torch: their per-round gathers are large enough to gain from
    threads."""

    def __init__(self, unit: torch.Tensor, near: torch.Tensor | None = None, window: int | None = None):
        self.unit, self.near, self.window = unit.detach(), near, window
        count = unit.shape[0]
        self.alive = torch.ones(count, dtype=torch.bool, device=unit.device)
        self.in_b = torch.zeros_like(self.alive)
        self.similarity, self.neighbours = nearest_neighbours(self.unit, max(1, min(NEIGHBOURS, count - 1)), near, window)

    def redundancy(self, side_a: np.ndarray, side_b: np.ndarray) -> np.ndarray:
        side_a, side_b = (torch.from_numpy(side).to(self.unit.device) for side in (side_a, side_b))
        self.in_b.zero_()
        self.in_b.index_fill_(0, side_b, True)
        # Most tokens find a B-token among their first few neighbours; only the others read their whole list,
        # and only those with none in it are rebuilt.
        best = self._nearest_in_b(side_a, LIST_HEAD)
        missed = best == -math.inf
        if missed.any():
            best[missed] = self._nearest_in_b(side_a[missed], None)
            missed = best == -math.inf
            if missed.any():
                best[missed] = self._rebuild(side_a[missed])
        return best.cpu().numpy()

    def _nearest_in_b(self, rows: torch.Tensor, length: int | None) -> torch.Tensor:
        """The similarity of each row's first list entry (of the first `length`) that sits in B, else -inf.

        The lists are sorted, so that entry is the row's nearest B-token (list padding is -inf too)."""
        neighbours = self.neighbours[:, :length].index_select(0, rows)
        hit = self.in_b.index_select(0, neighbours.view(-1)).view_as(neighbours)
        return torch.where(hit, self.similarity[:, :length].index_select(0, rows), -math.inf).amax(dim=1)

    def _rebuild(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact m for `rows` (live tokens whose lists hold no B-token), and fresh lists from the live tokens.

        A rebuild reads all the live features however few rows it serves, so the live tokens whose lists
        are more than half dead are rebuilt in the same pass, before they run out too."""
        width = self.neighbours.shape[1]
        live_entries = self.alive.index_select(0, self.neighbours.view(-1)).view_as(self.neighbours)
        stale = self.alive & ((live_entries & (self.similarity > -math.inf)).sum(dim=1) <= width // 2)
        stale[rows] = False
        refresh = torch.cat([rows, torch.nonzero(stale).flatten()])
        live_tokens = torch.nonzero(self.alive).flatten()
        live_unit, live_in_b = self.unit.index_select(0, live_tokens), self.in_b.index_select(0, live_tokens)
        length = min(width, live_tokens.numel() - 1)
        best = []
        for start in range(0, refresh.numel(), CHUNK_ROWS):
            part = refresh[start : start + CHUNK_ROWS]
            sim = cosines(self.unit.index_select(0, part), live_unit)
            itself = torch.searchsorted(live_tokens, part)  # every refreshed token is live
            sim[torch.arange(part.numel(), device=part.device), itself] = -math.inf
            if self.window is not None:
                far = (self.near[part][:, None] - self.near[live_tokens][None, :]).abs() > self.window
                sim.masked_fill_(far, -math.inf)
            values, index = sim.topk(length, dim=1)
            self.similarity[part, :length], self.neighbours[part, :length] = values, live_tokens[index]
            self.similarity[part, length:] = -math.inf
            if start < rows.numel():
                best.append(sim[: rows.numel() - start].masked_fill_(~live_in_b[None, :], -math.inf).amax(dim=1))
        return torch.cat(best)

    def drop(self, dropped: np.ndarray) -> None:
        self.alive[torch.from_numpy(dropped).to(self.unit.device)] = False


def important_and_diverse(
    scores: torch.Tensor,
    features: torch.Tensor,
    k: int,
    alpha: float = 0.5,
    step: int = 8,
    schedule: str = "fixed",
    ratio: float = 0.1,
    frame: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ⌊alpha·k⌋ top-scored tokens and fill the rest by de-duplicating the residual (docs/flashvlm.md §6),
    within `window` frames of each token where `frame` ([N], each token's frame) is given.

    Returns (keep [B, k] ascending, important [B, ⌊alpha·k⌋], diverse [B, k - ⌊alpha·k⌋]).
    """
    num_important = math.floor(alpha * k)
    ranked = scores.argsort(dim=-1, descending=True, stable=True)
    important, residual = ranked[:, :num_important], ranked[:, num_important:]
    diverse = bipartite_dedup(features, residual, k - num_important, step=step, schedule=schedule, ratio=ratio,
                              frame=frame, window=window)
    keep = torch.cat([important, diverse], dim=1).sort(dim=1).values
    return keep, important, diverse


@dataclass
class ImportantDiverse(Method):
    """Shared options and split for methods that keep an important share and fill the rest by diversity."""

    alpha: float = option(0.5, "share of the budget taken by the top score (docs/flashvlm.md §6)", at_least=0, at_most=1)
    dedup_step: int = option(8, "tokens dropped per de-duplication round (§7)", at_least=1)
    dedup_schedule: str = option("fixed", "'fixed' rounds as released, or 'geometric' (docs/diversity.md)",
                                 choices=("fixed", "geometric"))
    dedup_ratio: float = option(0.1, "fraction of the residual dropped per round when geometric", above=0, at_most=1)
    dedup_window: int | None = option(None, "video clips: a token's redundancy counts only tokens at most this many "
                                            "frames away; None: the whole clip, as released (docs/diversity.md, "
                                            "clip scale)", at_least=0)

    def split(self, scores: torch.Tensor, features: torch.Tensor, k: int, frames: tuple | None = None) -> Selection:
        """The important share by `scores`, the rest by the partition of `features`; with a video's `frames`
        (t, h, w) and `dedup_window`, the partition looks for redundancy within the window."""
        frame = None
        if frames is not None and self.dedup_window is not None:
            frame = torch.arange(features.shape[1], device=features.device) // (frames[1] * frames[2])
        keep, important, diverse = important_and_diverse(
            scores, features, k, self.alpha, self.dedup_step, self.dedup_schedule, self.dedup_ratio, frame,
            self.dedup_window,
        )
        return Selection(keep=keep, scores=scores, info={"important": important, "diverse": diverse})
