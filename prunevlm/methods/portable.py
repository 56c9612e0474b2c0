"""The same selection on every CPU (docs/diversity.md, "Same result on every CPU").

The rule, applied by every method whose selection follows an order: a quantity that decides an order (a
cosine, a norm, a relevance score, an exponential feeding a ranking) is computed in fp64 and rounded to fp32
before anything compares it, and exact ties go to the lowest position. A BLAS kernel or a thread count that
sums in another order moves an fp64 result by far less than half an fp32 ulp (the products of fp32 numbers
are exact in fp64), so the fp32 value it rounds to does not move, except for the rare value that lies that
close to a rounding boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# DivPrune and CDPruner form the whole N x N matrix up to this many tokens (a LLaVA-NeXT image of 5 crops);
# beyond (a video per clip), its rows a block at a time (`RowCache`)
WHOLE_MATRIX_TOKENS = 4608


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [..., D] scaled to unit length, in fp64 (a zero row stays zero)."""
    return F.normalize(x.double(), dim=-1)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosines of fp64 unit rows a [..., M, D] and b [..., K, D], [..., M, K], rounded to fp32."""
    return (a @ b.transpose(-1, -2)).float()


class RowCache:
    """Rows of a token-by-token matrix, computed on demand a block at a time, for greedy selections over more
    tokens than their whole matrix should hold (docs/baselines.md, "Clip scale"): a pick whose row is missing
    computes the rows of itself and of the `size` − 1 tokens then ranked highest, the likely next picks, in
    one matrix product (O(size · N) memory). Which rows are cached changes the time only, never a row."""

    def __init__(self, compute, size: int):
        self.compute, self.size = compute, size
        self.slot: dict[int, int] = {}
        self.rows: torch.Tensor | None = None

    def row(self, pick: int, ranking: torch.Tensor) -> torch.Tensor:
        """Row `pick`; `ranking` [N] ranks the candidates for the next block (chosen tokens at −inf)."""
        if pick not in self.slot:
            ahead = ranking.topk(min(self.size, ranking.numel())).indices.tolist()
            ids = [pick] + [i for i in ahead if i != pick][: self.size - 1]
            self.rows = self.compute(torch.tensor(ids, device=ranking.device))
            self.slot = {token: n for n, token in enumerate(ids)}
        return self.rows[self.slot[pick]]
