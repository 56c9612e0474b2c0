"""Attention rows and maps recomputed from a layer's queries and keys, so the tower can stay on SDPA."""

from __future__ import annotations

import torch


# Logits computed at once, at most (2 MB in fp32). The full 16-head map of CLIP-L in one piece (21 MB of
# logits, plus as much for the softmax) took 9 to 25 ms from one process to the next on 2 cores, a steady
# 7.5 ms head by head; large temporaries cost whatever the allocator's state makes them cost.
CHUNK_ELEMENTS = 1 << 19


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) over keys, averaged over heads, in fp32; heads in chunks of `CHUNK_ELEMENTS`.

    queries [..., H, Q, d], keys [..., H, K, d] -> [..., Q, K].
    """
    heads, dim = queries.shape[-3], queries.shape[-1]
    per_head = queries.numel() // (heads * dim) * keys.shape[-2]  # logits of one head, every batch entry
    step = max(1, CHUNK_ELEMENTS // per_head)
    total = None
    for start in range(0, heads, step):
        q, k = queries[..., start : start + step, :, :].float(), keys[..., start : start + step, :, :].float()
        probs = torch.softmax((q @ k.transpose(-1, -2)).mul_(scale), dim=-1).sum(dim=-3)
        total = probs if total is None else total.add_(probs)
    return total.div_(heads)


def attention_map(queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """The head-averaged attention map [S, S] from queries, keys [H, S, d], in query chunks."""
    return torch.cat([attention_probs(queries[:, start : start + chunk], keys, scale)
                      for start in range(0, queries.shape[-2], chunk)])


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """Attention each token receives, Σ_queries of the head-averaged map (docs/flashvlm.md §4, Qwen path).

    queries, keys [H, S, d] -> [S]. Queries are processed in chunks to bound memory at O(H·chunk·S).
    """
    total = torch.zeros(keys.shape[-2], dtype=torch.float32, device=keys.device)
    for start in range(0, queries.shape[-2], chunk):
        total += attention_probs(queries[:, start : start + chunk], keys, scale).sum(dim=0)
    return total


def pool_groups(values: torch.Tensor, group: int, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Average consecutive groups of `group` entries along each of `dims` (e.g. 2x2 merge units = 4)."""
    for dim in dims:
        dim = dim % values.ndim
        shape = values.shape
        values = values.reshape(*shape[:dim], shape[dim] // group, group, *shape[dim + 1 :]).mean(dim=dim + 1)
    return values
