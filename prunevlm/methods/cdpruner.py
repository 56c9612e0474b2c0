"""CDPruner (arXiv 2506.10967): a conditional determinantal point process over the projected tokens, its
MAP set found by the fast greedy of Chen et al. (arXiv 1709.05135) (docs/baselines.md, CDPruner).

The kernel is L = diag(r)·S·diag(r): S the cosine similarities of the projected tokens, r each token's
relevance to the instruction. Stock Hugging Face models carry no CLIP text tower, so the relevance is
measured in the LLM's input space instead: ρ_i = sign · mean over the prompt's text rows of
cos(image token i, text row), min-max normalised per image as the official code does (r ∝ ρ − min ρ + 10⁻⁶).
`relevance_sign=+1` (the default) is the paper's reading, more relevant = more similar; −1 is the official
code's, chosen there for CLIP (docs/baselines.md gives the reasoning). Rows without text get a constant
relevance: a pure cosine DPP.

The greedy runs exactly k steps. A token whose residual d_i² has fallen to `RESIDUAL_FLOOR` of its own L_ii
lies (numerically) in the span of the chosen tokens and brings no gain; once every candidate is such a
token (the kernel's rank is used up), the remaining picks go by L_ii, highest first, instead of dividing by
√d² ≤ 0 as the official code does.

So that the picks are the same on every CPU (`portable.py`), the cosines and ρ are computed in fp64 and
rounded to fp32, the kernel is formed from those fp32 numbers in fp64, the greedy runs in fp64, and every
comparison of residuals reads them rounded to fp32.

Up to `WHOLE_MATRIX_TOKENS` tokens the kernel is formed whole, for every image of the batch. Beyond (a video
per clip), each pick's kernel row is formed when it is picked from the same fp32 cosines (`RowCache`): the
same picks, O(N · k) memory for the greedy's vectors. A clip of more than `clip_segment` frames is chosen in
two steps, each run of frames first, then their pool (`run_pool`; docs/baselines.md, "Clip scale").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Selection, option
from .diversity import run_pool
from .portable import WHOLE_MATRIX_TOKENS, RowCache, cosines, unit_rows

OFFSET = 1e-6  # added before the min-max division in the official normalisation
RESIDUAL_FLOOR = 1e-4  # d_i² / L_ii at or below this: no gain left (fp64 rounding stays far below it)
ROW_BLOCK = 256  # beyond WHOLE_MATRIX_TOKENS, kernel rows formed at once (`RowCache`)


def relevance(image_tokens, text_embeds=None, text_mask=None, sign: float = 1.0) -> torch.Tensor:
    """r [B, N] in (0, 1], fp32: the official (ρ − min ρ + 10⁻⁶) / (max ρ − min ρ), divided by its maximum
    1 + 10⁻⁶ / (max ρ − min ρ), which leaves every pick unchanged (L only scales) and stays finite when ρ is
    constant (then r ≡ 1). Rows without text rows also get r ≡ 1. ρ is computed in fp64 and rounded to fp32."""
    if text_embeds is None:
        return torch.ones(image_tokens.shape[:2], device=image_tokens.device)
    weights = torch.ones(text_embeds.shape[:2], dtype=torch.float64, device=text_embeds.device) if text_mask is None \
        else text_mask.double()
    counts = weights.sum(dim=1, keepdim=True)
    similarity = unit_rows(image_tokens) @ unit_rows(text_embeds).transpose(1, 2)
    rho = (sign * (similarity * weights[:, None, :]).sum(dim=-1) / counts.clamp_min(1)).float()
    low = rho.amin(dim=1, keepdim=True)
    return (rho - low + OFFSET) / (rho.amax(dim=1, keepdim=True) - low + OFFSET)  # no text: ρ ≡ 0, r ≡ 1


def conditional_kernel(image_tokens: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """L = diag(q)·S·diag(q), S_ij = cos(v_i, v_j) rounded to fp32; [B, N, N] in fp64."""
    unit = unit_rows(image_tokens)
    quality = quality.double()
    return quality[:, :, None] * cosines(unit, unit).double() * quality[:, None, :]


def greedy_map(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast greedy MAP of a DPP with kernel [B, N, N]: (picks [B, k] in pick order, gains [B, k]).

    Each step picks j = argmax d², stores c_t = (L_j − Σ_τ c_τ,j c_τ) / d_j and lowers d² by c_t². The gain
    of a pick is its d² then, so log det L_S = Σ log gains while every gain is positive. Picks made after the
    kernel's rank is used up (module docstring) have gain 0. The residuals are compared rounded to fp32, and
    ties go to the lowest index (module docstring)."""
    batch, num_tokens, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    quality = kernel.diagonal(dim1=1, dim2=2)
    floor, ranked_quality = (RESIDUAL_FLOOR * quality).float(), quality.float()
    residual = quality.clone()  # d²
    vectors = kernel.new_zeros(k, batch, num_tokens)
    chosen = torch.zeros(batch, num_tokens, dtype=torch.bool, device=kernel.device)
    picks, gains = [], []
    for step in range(k):
        rounded = residual.float()
        gain = torch.where(rounded > floor, rounded, 0.0).masked_fill(chosen, -math.inf)
        pick = gain.argmax(dim=1)
        # always computed, so that no step reads back whether any image ran out (nothing synchronises)
        exhausted = gain[rows, pick] <= 0
        fallback = ranked_quality.masked_fill(chosen, -math.inf).argmax(dim=1)
        pick = torch.where(exhausted, fallback, pick)
        gains.append(torch.where(exhausted, 0.0, residual[rows, pick]))
        past = vectors[:step, rows, pick]  # [step, B]
        numerator = kernel[rows, pick] - torch.einsum("tb,tbn->bn", past, vectors[:step])
        vector = numerator / residual[rows, pick].clamp_min(torch.finfo(kernel.dtype).tiny).sqrt()[:, None]
        vector = torch.where(exhausted[:, None], 0.0, vector)
        vectors[step] = vector
        residual -= vector.square()
        chosen[rows, pick] = True
        picks.append(pick)
    return torch.stack(picks, dim=1), torch.stack(gains, dim=1)


def streamed_greedy_map(unit: torch.Tensor, quality: torch.Tensor, k: int,
                        block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`greedy_map` of one image, from its fp64 unit rows [N, D] and quality [N], without the N x N kernel:
    the same steps on the same numbers, each pick's kernel row formed from its fp32 cosines, `block` rows at a
    time (`RowCache`). With its rows, a block also takes Σ_τ c_τ,j c_τ over the steps made so far in one matrix
    product, so each step adds only the steps made since its block (fp64 sums in another order, which the
    fp32 rounding of the residuals absorbs). Returns (picks [k], gains [k])."""
    num_tokens = unit.shape[0]
    quality = quality.double()
    vectors = unit.new_zeros(k, num_tokens)
    step = since = 0

    def projected_rows(ids: torch.Tensor) -> torch.Tensor:
        """L_j − Σ_τ<step c_τ,j c_τ for j in ids."""
        nonlocal since
        since = step
        rows = quality[ids, None] * cosines(unit[ids], unit).double() * quality
        return rows - vectors[:step, ids].T @ vectors[:step]

    diagonal = quality * unit.square().sum(dim=-1).float().double() * quality
    floor, ranked_quality = (RESIDUAL_FLOOR * diagonal).float(), diagonal.float()
    residual = diagonal.clone()
    chosen = torch.zeros(num_tokens, dtype=torch.bool, device=unit.device)
    cache = RowCache(projected_rows, block)
    picks, gains = [], []
    for step in range(k):
        rounded = residual.float()
        gain = torch.where(rounded > floor, rounded, 0.0).masked_fill(chosen, -math.inf)
        pick = int(gain.argmax())
        if gain[pick] <= 0:  # no gain left anywhere: by L_ii, no update
            pick = int(ranked_quality.masked_fill(chosen, -math.inf).argmax())
            gains.append(residual.new_zeros(()))
        else:
            gains.append(residual[pick].clone())
            row = cache.row(pick, gain)
            numerator = row - vectors[since:step, pick] @ vectors[since:step]
            vectors[step] = numerator / residual[pick].clamp_min(torch.finfo(unit.dtype).tiny).sqrt()
            residual -= vectors[step].square()
        chosen[pick] = True
        picks.append(pick)
    return torch.tensor(picks, device=unit.device), torch.stack(gains)


@dataclass
class CDPruner(Method):
    name: ClassVar[str] = "cdpruner"
    description: ClassVar[str] = (
        "text-conditioned diversity: a DPP over the projected tokens, weighted by their relevance to the "
        "prompt's input embeddings, fast greedy MAP"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens",)
    optional_signals: ClassVar[tuple[str, ...]] = ("text_embeds", "text_mask", "frames")

    relevance_sign: int = option(1, "+1: more similar to the prompt = more relevant (paper); -1: the official "
                                    "code's inverted relevance, chosen there for CLIP (docs/baselines.md)",
                                 choices=(1, -1))
    theta: float | None = option(None, "None: the kernel weights tokens by r (official default); a value θ in "
                                       "[0, 1) weights them by exp(α·r), α = θ / (2(1 − θ)), the code's "
                                       "disabled alternative (docs/baselines.md)", at_least=0, at_most=0.999)
    clip_segment: int | None = option(8, "video per clip: each run of this many frames keeps 2x its share first, "
                                         "then their pool keeps k, relevance over the whole clip (a clip of at "
                                         "most this many frames, and every image, exactly as released); None: the "
                                         "exact greedy over any clip (docs/baselines.md, clip scale)", at_least=1)

    def select(self, k, image_tokens, text_embeds=None, text_mask=None, frames=None) -> Selection:
        r = relevance(image_tokens, text_embeds, text_mask, float(self.relevance_sign))
        quality = r if self.theta is None else torch.exp(self.theta / (2 * (1 - self.theta)) * r.double()).float()
        segmented = frames is not None and self.clip_segment is not None and frames[0] > self.clip_segment
        if image_tokens.shape[1] <= WHOLE_MATRIX_TOKENS and not segmented:
            order, gains = greedy_map(conditional_kernel(image_tokens, quality), k)
        else:
            picked = [self.clip_map(unit_rows(image), weights, k, frames if segmented else None)
                      for image, weights in zip(image_tokens, quality)]
            order, gains = (torch.stack(part) for part in zip(*picked))
        return Selection(keep=order.sort(dim=1).values, scores=r, info={"order": order, "gains": gains})

    def clip_map(self, unit: torch.Tensor, quality: torch.Tensor, k: int,
                 frames: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One item's (picks [k], gains [k]): at once, or by runs of `clip_segment` frames then their pool
        where `frames` is given; the relevance is the clip's in both steps."""
        if frames is None:
            return streamed_greedy_map(unit, quality, k, ROW_BLOCK)

        def choose(positions, count):
            return positions[streamed_greedy_map(unit[positions], quality[positions], count, ROW_BLOCK)[0]]

        pool = run_pool(choose, unit.shape[0], k, frames, self.clip_segment, unit.device)
        order, gains = streamed_greedy_map(unit[pool], quality[pool], k, ROW_BLOCK)
        return pool[order], gains
