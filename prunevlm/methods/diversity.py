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

At clip scale, `segment` (the methods' `dedup_segment`) runs the partition in two steps (`segmented_dedup`):
each run of that many frames de-duplicates its own residual tokens down to POOL times its share of `keep`,
then the pooled tokens of the whole clip, in residual order, go through the rounds down to `keep`. Each
step is small, so the cost grows with the clip's length, not its square (docs/diversity.md, "Clip scale").

Every path compares the same numbers: cosines of fp64 unit vectors rounded to fp32 (`portable.py`), so
their order does not depend on the CPU's kernels or threads, and ties among A go by A's order (a stable
sort), as in the released loop (docs/diversity.md, "Same result on every CPU").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import Method, Selection, option
from .portable import cosines, unit_rows
from ..errors import InvalidOption

DENSE_TOKENS = 2048  # up to this many tokens the whole cosine matrix is kept (16 MB in fp32)
NEIGHBOURS = 64  # length of the nearest-neighbour lists; a speed knob only, results do not depend on it
LIST_HEAD = 8  # list entries read first each round, the rest only where none is in B; a speed knob too
CHUNK_ROWS = 1024  # side of the blocks of the cosine matrix computed at once for the lists, and rows per rebuild
POOL = 4  # a segment keeps this many times its share of the budget for the clip-wide rounds (dedup_segment)
CLIP_POOL = 2  # DivPrune's and CDPruner's runs of frames keep this many times their share (clip_segment)


def drops_per_round(residual: int, keep: int, step: int, schedule: str, ratio: float) -> int:
    """How many A-tokens one round drops (never more than |A|, never past `keep`)."""
    if schedule == "fixed":
        r = step
    elif schedule == "geometric":
        r = max(step, math.ceil(ratio * residual))
    else:
        raise InvalidOption(f"unknown dedup schedule {schedule!r}; use 'fixed' or 'geometric'")
    return min(r, residual - keep, (residual + 1) // 2)


def bipartite_dedup(
    features: torch.Tensor,
    order: torch.Tensor,
    keep: int,
    step: int = 8,
    schedule: str = "fixed",
    ratio: float = 0.1,
    stats: dict | None = None,
) -> torch.Tensor:
    """Shrink the residual `order` ([B, R] token indices into `features` [B, N, D]) to `keep` tokens.

    Returns [B, keep] token indices (in the final round's order, not sorted). `stats`, if given, receives
    the number of rounds, which is the same for every image: it depends only on R, `keep` and the schedule.
    """
    residual = order.shape[1]
    if keep < 0:
        raise InvalidOption(f"keep must be >= 0, got {keep}")
    if step < 1:
        raise InvalidOption(f"dedup step must be >= 1, got {step}")
    if keep >= residual:
        return order
    if keep == 0:
        return order[:, :0]
    chosen = features.gather(1, order[..., None].expand(-1, -1, features.shape[-1]))
    unit = unit_rows(chosen.detach())
    if residual <= DENSE_TOKENS or features.device.type != "cpu":
        positions = dense_rounds(symmetric_gram(unit), keep, step, schedule, ratio)
    else:
        positions = torch.stack([list_rounds(image, keep, step, schedule, ratio) for image in unit])
    if stats is not None:
        stats["rounds"] = count_rounds(residual, keep, step, schedule, ratio)
    return order.gather(1, positions)


def segmented_dedup(features: torch.Tensor, order: torch.Tensor, keep: int, frame: torch.Tensor, segment: int,
                    step: int = 8, schedule: str = "fixed", ratio: float = 0.1) -> torch.Tensor:
    """`bipartite_dedup` in two steps (module docstring): the residual `order` [B, R] split by `frame` ([N], each
    token's frame) into runs of `segment` frames, each run (in residual order) shrunk to min(its size,
    ⌈POOL · keep · its size / R⌉), then the pooled tokens, in residual order, shrunk to `keep`. One segment
    holding the whole residual is the one-step partition. Returns [B, keep] token indices."""
    if keep >= order.shape[1] or keep == 0:
        return bipartite_dedup(features, order, keep, step, schedule, ratio)
    runs = frame.to(order.device)[order] // segment  # [B, R], each residual token's run
    rank = torch.empty(features.shape[1], dtype=torch.long, device=order.device)  # a token's position in `order`
    chosen = []
    for image in range(order.shape[0]):
        rank[order[image]] = torch.arange(order.shape[1], device=order.device)
        if runs[image].unique().numel() == 1:
            chosen.append(bipartite_dedup(features[image : image + 1], order[image : image + 1], keep, step, schedule,
                                          ratio)[0])
            continue
        pooled = []
        for run in runs[image].unique():
            positions = torch.nonzero(runs[image] == run).flatten()  # ascending: residual order kept
            share = min(positions.numel(), math.ceil(POOL * keep * positions.numel() / order.shape[1]))
            kept = bipartite_dedup(features[image : image + 1], order[image : image + 1, positions], share, step,
                                   schedule, ratio)[0]
            pooled.append(rank[kept])
        pool = torch.cat(pooled).sort().values  # the pooled tokens in residual order
        chosen.append(bipartite_dedup(features[image : image + 1], order[image : image + 1, pool], keep, step,
                                      schedule, ratio)[0])
    return torch.stack(chosen)


def run_pool(choose, num_tokens: int, k: int, frames: tuple, segment: int, device=None,
             pool: int = CLIP_POOL) -> torch.Tensor:
    """The first of two steps that choose k positions of one video, as `segmented_dedup` does for the partition
    (docs/baselines.md, "Clip scale"): each run of `segment` frames of `frames` (t, h, w) keeps min(its size,
    ⌈pool · k · its size / N⌉) of its tokens; returns the pooled positions, ascending, from which the caller
    keeps k. `choose(positions, count)` picks `count` of the ascending `positions`."""
    run = segment * frames[1] * frames[2]
    pooled = []
    for start in range(0, num_tokens, run):
        positions = torch.arange(start, min(start + run, num_tokens), device=device)
        share = min(positions.numel(), math.ceil(pool * k * positions.numel() / num_tokens))
        pooled.append(positions if share == positions.numel() else choose(positions, share))
    return torch.cat(pooled).sort().values


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


def list_rounds(unit: torch.Tensor, keep: int, step: int, schedule: str, ratio: float) -> torch.Tensor:
    """The rounds for one image [R, D] from nearest-neighbour lists (CPU, R > DENSE_TOKENS): [keep] positions."""
    scorer = ListRedundancy(unit)
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


def nearest_neighbours(unit: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's `width` most similar other tokens, (similarity, index) sorted descending; `unit` are fp64
    unit rows and the similarities their cosines rounded to fp32.

    The cosine matrix is computed in CHUNK_ROWS blocks, only those on or above the diagonal: block (i, j)
    gives candidates to the rows of chunk i, and transposed to those of chunk j (cosine is symmetric), so
    about half the products of the full matrix are computed. Each row keeps its best `width` candidates."""
    count = unit.shape[0]
    starts = list(range(0, count, CHUNK_ROWS))
    candidates: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in starts]
    for i, row_start in enumerate(starts):
        rows = unit[row_start : row_start + CHUNK_ROWS]
        for j in range(i, len(starts)):
            column_start = starts[j]
            block = cosines(rows, unit[column_start : column_start + CHUNK_ROWS])
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
        best, position = values.topk(width, dim=1)
        similarity.append(best)
        neighbours.append(index.gather(1, position))
    return torch.cat(similarity), torch.cat(neighbours)


class ListRedundancy:
    """m(a) from nearest-neighbour lists (sorted, descending), rebuilt against the live tokens when exhausted;
    `unit` are fp64 unit rows.

    The lists stay on the features' device in torch: their per-round gathers are large enough to gain from
    threads."""

    def __init__(self, unit: torch.Tensor):
        self.unit = unit.detach()
        count = unit.shape[0]
        self.alive = torch.ones(count, dtype=torch.bool, device=unit.device)
        self.in_b = torch.zeros_like(self.alive)
        self.similarity, self.neighbours = nearest_neighbours(self.unit, max(1, min(NEIGHBOURS, count - 1)))

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
    segment: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ⌊alpha·k⌋ top-scored tokens and fill the rest by de-duplicating the residual (docs/flashvlm.md §6);
    in two steps, runs of `segment` frames then the clip, where `frame` ([N], each token's frame) is given.

    Returns (keep [B, k] ascending, important [B, ⌊alpha·k⌋], diverse [B, k - ⌊alpha·k⌋]).
    """
    num_important = math.floor(alpha * k)
    ranked = scores.argsort(dim=-1, descending=True, stable=True)
    important, residual = ranked[:, :num_important], ranked[:, num_important:]
    if frame is None or segment is None:
        diverse = bipartite_dedup(features, residual, k - num_important, step=step, schedule=schedule, ratio=ratio)
    else:
        diverse = segmented_dedup(features, residual, k - num_important, frame, segment, step, schedule, ratio)
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
    dedup_segment: int | None = option(8, "video clips per clip: de-duplicate each run of this many frames first, "
                                          "then the pooled tokens over the clip (a clip of at most this many frames, "
                                          "and every image, as released); None: the whole clip at once "
                                          "(docs/diversity.md, clip scale)", at_least=1)

    def split(self, scores: torch.Tensor, features: torch.Tensor, k: int, frames: tuple | None = None) -> Selection:
        """The important share by `scores`, the rest by the partition of `features`; on a video's `frames`
        (t, h, w) with `dedup_segment`, the partition runs in two steps."""
        frame = None
        if frames is not None and self.dedup_segment is not None:
            frame = torch.arange(features.shape[1], device=features.device) // (frames[1] * frames[2])
        keep, important, diverse = important_and_diverse(
            scores, features, k, self.alpha, self.dedup_step, self.dedup_schedule, self.dedup_ratio, frame,
            self.dedup_segment,
        )
        return Selection(keep=keep, scores=scores, info={"important": important, "diverse": diverse})
