"""Patch-level information entropy (VFlowOpt, docs/vflowopt.md §2.2)."""

from __future__ import annotations

import torch

from ..errors import InvalidOption

# OpenAI CLIP normalisation, used by the LLaVA-1.5 and Qwen2-VL image processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


CODE_CASTS = ("wrap", "saturate")  # readings of the official float -> uint8 cast (docs/methods.md, VFlowOpt)


def grey_levels(
    patches: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, mode: str = "paper", code_cast: str = "wrap"
) -> torch.Tensor:
    """Integer grey levels 0..255 of normalised pixel blocks [..., C, h, w] -> [..., h, w].

    "paper": undo the processor's normalisation to raw 0-255 intensities, the paper's intent.
    "code": the official code's computation on the normalised tensor, `(x * 255).to(torch.uint8)`, whose
    result for values outside [0, 256) depends on how the cast is read (`code_cast`, docs/methods.md):
      "wrap": truncate toward zero, then keep the value mod 256 (PyTorch's CPU cast, which goes through
              int64: -100.7 -> 156, 300.2 -> 44); computed explicitly here, so it is the same on every device;
      "saturate": truncate, then clamp to [0, 255], so every pixel darker than the mean becomes 0.
    Which one the official CUDA runs performed is unverified. `code_cast` is read only in "code" mode.
    Both modes then average the channels with equal weights and round.
    """
    if mode == "paper":  # channel by channel with Python scalars: no host-to-device copy of mean and std
        pixels = patches.float()
        values = torch.stack([pixels[..., c, :, :] * s + m for c, (m, s) in enumerate(zip(mean, std))], dim=-3)
        values = (values * 255).round().clamp(0, 255)
    elif mode == "code":
        scaled = patches.float() * 255
        if code_cast == "wrap":
            values = scaled.to(torch.int64).remainder(256).float()  # float -> int64 truncates toward zero
        elif code_cast == "saturate":
            values = scaled.clamp(0, 255).trunc()
        else:
            raise InvalidOption(f"code_cast must be 'wrap' or 'saturate', got {code_cast!r}")
    else:
        raise InvalidOption(f"entropy mode must be 'paper' or 'code', got {mode!r}")
    return values.mean(dim=-3).round()


def patch_entropy(levels: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the 256-bin histogram of each block's grey levels: [..., h, w] -> [...].

    Computed in fp64 and rounded to fp32, so that it is the same on every CPU (docs/diversity.md, "Same
    result on every CPU"): it ranks the tokens through VFlowOpt's importance."""
    flat = levels.flatten(start_dim=-2).long().clamp(0, 255)
    counts = torch.zeros(*flat.shape[:-1], 256, dtype=torch.float64, device=flat.device).scatter_add_(
        -1, flat, torch.ones_like(flat, dtype=torch.float64))
    p = counts / flat.shape[-1]
    return (-(p * torch.log2(p + 1e-10)).sum(dim=-1)).float()
