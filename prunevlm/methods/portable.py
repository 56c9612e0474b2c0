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


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [..., D] scaled to unit length, in fp64 (a zero row stays zero)."""
    return F.normalize(x.double(), dim=-1)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosines of fp64 unit rows a [..., M, D] and b [..., K, D], [..., M, K], rounded to fp32."""
    return (a @ b.transpose(-1, -2)).float()
