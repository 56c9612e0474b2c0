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


# Logits of one block of received_attention (1 MB in fp32): a block of query rows of one head (or whole
# heads, where they are smaller). At SigLIP-so400m size (729 tokens, 16 heads) on 2 cores this was the fastest
# of 2^16..2^20, 2x-3x faster than the head-averaged map it replaces (benchmarks/siglip_saliency.py).
RECEIVED_BLOCK_ELEMENTS = 1 << 18


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each token receives: the column sums of the head-averaged softmax map, Σ over queries of
    mean over heads of softmax(q kᵀ · scale), in fp32 (docs/flashvlm.md §4, Qwen path; docs/models.md §4).

    queries [..., H, Q, d], keys [..., H, K, d] -> [..., K]. Neither the map nor its head average is formed:
    each block of `RECEIVED_BLOCK_ELEMENTS` logits (query rows of one head, or whole heads) gets a fused row
    softmax and is summed over its rows into that head's column totals at once, so memory stays O(block + H·K).
    """
    *batch, heads, length, dim = queries.shape
    width = keys.shape[-2]
    # the scale applied to the queries (Q x d) rather than to the logits (Q x K)
    queries, keys = queries.reshape(-1, length, dim).float() * scale, keys.reshape(-1, width, dim)
    entries = max(1, RECEIVED_BLOCK_ELEMENTS // (length * width))
    rows = min(length, max(1, RECEIVED_BLOCK_ELEMENTS // width))
    total = torch.zeros(queries.shape[0], width, dtype=torch.float32, device=keys.device)
    for entry in range(0, queries.shape[0], entries):
        keys_t = keys[entry : entry + entries].float().transpose(-1, -2)
        for start in range(0, length, rows):
            logits = queries[entry : entry + entries, start : start + rows] @ keys_t
            total[entry : entry + entries] += torch.softmax(logits, dim=-1).sum(dim=-2)
    return total.view(*batch, heads, width).sum(dim=-2).div_(heads)


def pool_groups(values: torch.Tensor, group: int, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Average consecutive groups of `group` entries along each of `dims` (e.g. 2x2 merge units = 4)."""
    for dim in dims:
        dim = dim % values.ndim
        shape = values.shape
        values = values.reshape(*shape[:dim], shape[dim] // group, group, *shape[dim + 1 :]).mean(dim=dim + 1)
    return values
