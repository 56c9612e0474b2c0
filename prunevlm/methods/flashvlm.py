"""FlashVLM: text-guided visual token selection (arXiv 2512.20561; formulas from the official code,
docs/flashvlm.md).

Relevance of each projected image token to the prompt's LLM input embeddings is pooled over the text,
sharpened, and fused in the log domain with the vision saliency. Half the budget goes to the top of the
fused score, half to a diversity-preserving partition of the rest (`diversity.py`).

Without text (no `text_embeds`, `text_embeds` with L = 0, or a row whose `text_mask` is all False) the
ranking score of that row is the saliency itself as float, exactly the score VisPruner ranks by, so the
selection of such a row (important share, residual order fed to the diversity partition, diverse share) is
index-identical to VisPruner's for any saliency, ties included (docs/methods.md, FlashVLM). The fused formula
with T ≡ ε, which the official code applies, keeps the saliency order only above the floor: every token
with minmax(saliency) < ε ties there; `no_text_score="fused"` reproduces it. Rows with text always use the
fused score, unaffected by the other rows of the batch.

Each step (relevance, sharpening, fusion) computes in fp64 and returns its result rounded to fp32, and the
sharpening's threshold compares fp32 values, so the ranking is the same on every CPU (`portable.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Selection, minmax, option
from .diversity import ImportantDiverse
from .portable import unit_rows


def text_relevance(
    image_tokens: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    temperature: float = 0.05,
    norm_gating: bool = False,
) -> torch.Tensor:
    """s_i = Σ_j softmax_j(S_ij / temperature) · S_ij with S_ij = cos(image token i, text row j) (§2 steps 1–3).

    `norm_gating` reproduces the official Qwen2.5-VL path, which scales each normalised text row by
    ‖e_j‖ / max_k ‖e_k‖ (§1; a no-op in the official LLaVA path). Rows without text give NaN. Computed in
    fp64, returned in fp32 (module docstring).
    """
    image_tokens = image_tokens.double()
    unit_text = unit_rows(text_embeds)
    if norm_gating:
        norms = text_embeds.double().norm(dim=-1)
        if text_mask is not None:
            norms = norms.masked_fill(~text_mask.bool(), 0.0)
        unit_text = unit_text * (norms / norms.amax(dim=-1, keepdim=True).clamp_min(1e-12))[..., None]
    # cos(x, u) = (x . u) / |x|: the image norms divide the [B, N, L] product, not the [B, N, D] tokens
    image_norms = image_tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (image_tokens @ unit_text.transpose(1, 2)) / image_norms  # [B, N, L]
    logits = sim / temperature
    if text_mask is not None:
        padded = ~text_mask.bool()[:, None, :]
        logits, sim = logits.masked_fill(padded, float("-inf")), sim.masked_fill(padded, 0.0)
    return (torch.softmax(logits, dim=-1) * sim).sum(dim=-1).float()


def sharpen(
    relevance: torch.Tensor,
    temperature: float = 0.01,
    gamma: float = 2.5,
    top_p: float = 0.005,
    damping: float = 0.1,
) -> torch.Tensor:
    """Temperature sharpening and top-p sparsification over image tokens (§3 steps 4–5), in [0, 1].

    p = softmax(s / τ_s); q = minmax(p^γ); tokens below the (1 − top_p) quantile are multiplied by
    `damping`; min-max again. In closed form t_i ≈ damping^[i ∉ top] · exp((γ/τ_s)(s_i − max s)) (§3 (6)).
    In fp64; q is rounded to fp32 before the threshold (interpolated in fp64 between two of its values)
    decides, and the result is returned in fp32 (module docstring).
    """
    p = torch.softmax(relevance.double() / temperature, dim=-1)
    q = minmax(p.pow(gamma)).float().double()
    threshold = torch.quantile(q, 1.0 - top_p, dim=-1, keepdim=True, interpolation="linear")
    q = torch.where(q < threshold, q * damping, q)
    return minmax(q).float()


def fuse(saliency: torch.Tensor, text_score: torch.Tensor | None, eta: float = 0.5, floor: float = 1e-6) -> torch.Tensor:
    """f = minmax(A^(1−η) · T^η) with A = max(minmax(saliency), floor), T = max(t, floor) (§4–§5).

    Without text, T ≡ floor: the order of f is the saliency's except that every saliency whose min-max value
    is below the floor ties with the others there. `FlashVLM.scores` therefore ranks such rows by the
    saliency itself, and uses this formula only for rows with text. A and f are computed in fp64 and
    rounded to fp32 (module docstring).
    """
    a = minmax(saliency.double()).float().clamp_min(floor)
    t = torch.full_like(a, floor) if text_score is None else text_score.float().clamp_min(floor)
    return minmax(torch.exp((1.0 - eta) * a.double().log() + eta * t.double().log())).float()


@dataclass
class FlashVLM(ImportantDiverse):
    name: ClassVar[str] = "flashvlm"
    description: ClassVar[str] = (
        "text-guided: prompt/image cosine relevance, sharpened and fused in the log domain with vision "
        "saliency; half the budget by that score, half by a diversity-preserving partition"
    )
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "saliency")
    optional_signals: ClassVar[tuple[str, ...]] = ("text_embeds", "text_mask", "features", "frames")

    eta: float = option(0.5, "text weight in the log-domain fusion (docs/flashvlm.md §5)", at_least=0, at_most=1)
    text_temperature: float = option(0.05, "softmax pooling over the text tokens (§2 step 3)", above=0)
    sharpen_temperature: float = option(0.01, "τ_s of the sharpening softmax over image tokens (§3 step 4)", above=0)
    gamma: float = option(2.5, "power after sharpening (§3 step 4)", above=0)
    top_p: float = option(0.005, "top fraction of image tokens left undamped (§3 step 5)", above=0, at_most=1)
    damping: float = option(0.1, "factor for the tokens below the top fraction (§3 step 5)", above=0, at_most=1)
    floor: float = option(1e-6, "ε before the logarithms (§5)", above=0)
    text_norm_gating: bool = option(False, "official Qwen2.5-VL path: weight text rows by their norm (§1)")
    text_scope: str = option("prompt", "'prompt': every non-image token; 'prefix': only the text before the "
                                       "first image (§8)", choices=("prompt", "prefix"))
    no_text_score: str = option("saliency", "rows without text rank by 'saliency' (= VisPruner) or by the "
                                            "'fused' floor-tied score of the official code (docs/methods.md)",
                                choices=("saliency", "fused"))

    @property
    def text_before_first_image(self) -> bool:
        return self.text_scope == "prefix"

    @staticmethod
    def has_text(text_embeds, text_mask) -> torch.Tensor | None:
        """[B] bool, True for rows with at least one text row; None when no text is given at all."""
        if text_embeds is None or text_embeds.shape[1] == 0:
            return None
        if text_mask is None:
            return torch.ones(text_embeds.shape[0], dtype=torch.bool, device=text_embeds.device)
        return text_mask.bool().any(dim=1)

    def text_score(self, image_tokens, text_embeds, text_mask) -> torch.Tensor | None:
        """t_i in [0, 1], or None without text; rows with no text get the floor."""
        has_text = self.has_text(text_embeds, text_mask)
        if has_text is None:
            return None
        relevance = text_relevance(image_tokens, text_embeds, text_mask, self.text_temperature, self.text_norm_gating)
        relevance = torch.where(has_text[:, None], relevance, 0.0)
        t = sharpen(relevance, self.sharpen_temperature, self.gamma, self.top_p, self.damping)
        return torch.where(has_text[:, None], t, self.floor)

    def scores(self, image_tokens, saliency, text_embeds=None, text_mask=None) -> torch.Tensor:
        """The ranking score [B, N]: the fused f (in [0, 1]) for rows with text, and for rows without it the
        saliency itself as float, VisPruner's score, so that those rows select exactly as VisPruner does
        (module docstring); with `no_text_score="fused"` every row gets f. Rows with text are unchanged by
        the rows without."""
        if self.no_text_score == "fused":
            return fuse(saliency, self.text_score(image_tokens, text_embeds, text_mask), self.eta, self.floor)
        has_text = self.has_text(text_embeds, text_mask)
        if has_text is None:  # no text at all; rows without text are chosen on the device, without a read
            return saliency.float()
        fused = fuse(saliency, self.text_score(image_tokens, text_embeds, text_mask), self.eta, self.floor)
        return torch.where(has_text[:, None], fused, saliency.float())

    def select(self, k, image_tokens, saliency, text_embeds=None, text_mask=None, features=None,
               frames=None) -> Selection:
        fused = self.scores(image_tokens, saliency, text_embeds, text_mask)
        return self.split(fused, image_tokens if features is None else features, k, frames)
