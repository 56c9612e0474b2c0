"""Attention rows and maps recomputed from a layer's queries and keys, so the tower can stay on SDPA."""

from __future__ import annotations

import torch


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) over keys, averaged over heads, in fp32.

    queries [..., H, Q, d], keys [..., H, K, d] -> [..., Q, K].
    """
    logits = (queries.float() @ keys.float().transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1).mean(dim=-3)


def attention_map(queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """The head-averaged attention map [S, S] from queries, keys [H, S, d], in query chunks."""
    return torch.cat([attention_probs(queries[:, start : start + chunk], keys, scale)
                      for start in range(0, queries.shape[-2], chunk)])


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """Attention each token receives, Σ_queries of the head-averaged map (flashvlm.md §1.4, Qwen path).

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
