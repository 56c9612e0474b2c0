"""Decoding steps after a pruned prefill: masks and positions that continue the pruned prompt
(docs/transformers.md §1)."""

from __future__ import annotations

import torch

from .contract import Call, ContractError
from .record import Prefill


def fix_decode(prefill: Prefill, call: Call, past, positions_policy: str) -> tuple[tuple, dict]:
    """A decoding step after a pruned prefill: the caller's mask narrowed to the kept prompt columns, and its
    positions shifted (compact) or supplied where it passed none."""
    embeds = call["inputs_embeds"]
    steps = embeds.shape[1]
    past_length = past.get_seq_length()
    generated = past_length - prefill.pruned_length + steps  # tokens after the prompt, this step included
    if generated < steps:
        raise ContractError(f"a decoding step's cache holds {past_length} tokens, fewer than the "
                            f"{prefill.pruned_length} the pruned prefill left")
    mask = call.get("attention_mask")
    if mask is not None:
        if isinstance(mask, dict) or mask.dim() != 2:
            raise NotImplementedError("pruning needs 2D attention masks while decoding (use the dynamic cache)")
        if mask.shape[1] != prefill.prompt_length + generated:
            raise ValueError(
                f"decoding mask has {mask.shape[1]} columns; expected the unpruned prompt ({prefill.prompt_length}) "
                f"plus {generated} generated tokens"
            )
        call.update(attention_mask=torch.cat([prefill.prompt_mask.to(mask.dtype), mask[:, prefill.prompt_length:]], dim=1))
    elif not bool(prefill.prompt_mask.all()):
        ones = torch.ones(prefill.prompt_mask.shape[0], generated, dtype=prefill.prompt_mask.dtype, device=prefill.prompt_mask.device)
        call.update(attention_mask=torch.cat([prefill.prompt_mask, ones], dim=1))
    positions = call.get("position_ids")
    if positions_policy == "compact":
        if positions is not None:
            call.update(position_ids=positions - prefill.removed.to(positions.device))
    elif positions is None:
        start = past_length + prefill.prompt_length - prefill.pruned_length
        call.update(position_ids=torch.arange(start, start + steps, device=embeds.device).expand(embeds.shape[0], -1))
    return call.update()
