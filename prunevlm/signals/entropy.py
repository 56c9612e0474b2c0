"""Patch-level information entropy (VFlowOpt, vflowopt.md §2.2)."""

from __future__ import annotations

import torch

# OpenAI CLIP normalisation, used by the LLaVA-1.5 and Qwen2-VL image processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def grey_levels(patches: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, mode: str = "paper") -> torch.Tensor:
    """Integer grey levels 0..255 of normalised pixel blocks [..., C, h, w] -> [..., h, w].

    "paper": undo the processor's normalisation to raw 0-255 intensities, the paper's intent.
    "code": the official code's computation on the normalised tensor: x * 255 cast to uint8, which on CUDA
    saturates (negatives become 0), so every pixel darker than the mean collapses to 0 (§2.2 quirk).
    Both then average the channels with equal weights and round.
    """
    shape = (-1, 1, 1)
    if mode == "paper":
        mean_t = torch.tensor(mean, dtype=torch.float32, device=patches.device).view(shape)
        std_t = torch.tensor(std, dtype=torch.float32, device=patches.device).view(shape)
        values = ((patches.float() * std_t + mean_t) * 255).round().clamp(0, 255)
    elif mode == "code":
        values = (patches.float() * 255).clamp(0, 255).trunc()
    else:
        raise ValueError(f"entropy mode must be 'paper' or 'code', got {mode!r}")
    return values.mean(dim=-3).round()


def patch_entropy(levels: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the 256-bin histogram of each block's grey levels: [..., h, w] -> [...]."""
    flat = levels.flatten(start_dim=-2).long().clamp(0, 255)
    counts = torch.zeros(*flat.shape[:-1], 256, device=flat.device).scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.float32))
    p = counts / flat.shape[-1]
    return -(p * torch.log2(p + 1e-10)).sum(dim=-1)
