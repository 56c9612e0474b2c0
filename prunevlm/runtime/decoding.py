"""Decoding steps after a pruned prefill: which input tokens are new, and the masks and positions that continue
the pruned prompt (docs/transformers.md §1, decoding and continuing a cache).

A step's cache holds the pruned prompt (L' columns) plus the tokens fed since; the caller still counts the
unpruned prompt (L columns). Everything the caller passes is read in its own, unpruned coordinates:
- the attention mask covers the whole sequence: L + cached + new columns;
- generate() continuing a returned cache (called with `out.sequences` and the cache it returned) slices
  the new input by the cache's length, which is short by L - L', so it feeds L - L' tokens that the cache
  already holds before the new ones: those are dropped here (the step returns outputs for the new tokens);
- position ids are the unpruned model's. Those the caller passed must be the ones the prompt implies (the
  prompt's last position + 1, counting on over the attended tokens since), else the step is refused; where the
  caller passed none, the model's own (counted from the shorter cache) are replaced by those.
Any other count of already-cached tokens, or a mask of another length, is refused: nothing runs unchecked.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInput, Unsupported
from .contract import Call, ContractError
from .record import Prefill


def fix_decode(prefill: Prefill, call: Call, past, caller_positions: bool) -> tuple[tuple, dict]:
    """The language model's call for a decoding step after `prefill` (see the module docstring);
    `caller_positions`: whether the caller passed position ids (else any here are the model's own)."""
    embeds = call["inputs_embeds"]
    steps = embeds.shape[1]
    cached = past.get_seq_length() - prefill.pruned_length  # tokens after the prompt already in the cache
    if cached < 0:
        raise ContractError(f"a decoding step's cache holds {past.get_seq_length()} tokens, fewer than the "
                            f"{prefill.pruned_length} the pruned prefill left")
    removed = prefill.prompt_length - prefill.pruned_length
    mask, positions = call.get("attention_mask"), call.get("position_ids")
    if mask is not None:
        if isinstance(mask, dict) or mask.dim() != 2:
            raise Unsupported("pruning needs 2D attention masks [batch, length] while decoding, not prepared 4D ones: "
                              "pass the 2D mask (generate() does, with the default dynamic cache)")
        new = mask.shape[1] - prefill.prompt_length - cached
        if new < 1 or steps - new not in (0, removed):
            raise InvalidInput(
                f"a decoding step after a pruned prompt got {steps} input token(s) and an attention mask of "
                f"{mask.shape[1]} columns, but the cache holds the prompt ({prefill.prompt_length} columns before "
                f"pruning) and {cached} token(s) since: pass a mask of the whole sequence and either only the new "
                f"tokens or, as generate() does, the tokens after the cache's length ({removed} more)")
    elif positions is not None and caller_positions:
        new = _new_by_positions(prefill, positions, steps, cached, removed)
    else:
        new = steps
    overlap = steps - new
    if overlap:
        embeds, positions = embeds[:, overlap:], None if positions is None else positions[..., overlap:]
    tail = None if mask is None else mask[:, prefill.prompt_length:]  # the columns after the prompt
    offsets = (cached + torch.arange(new, device=embeds.device) if tail is None
               else (tail.long().cumsum(dim=-1) - 1)[:, -new:].clamp_min(0).to(embeds.device))
    expected = prefill.next_position[..., None].to(embeds.device) + offsets
    if positions is not None and caller_positions:
        attended = None if tail is None else tail[:, -new:].bool().to(embeds.device)
        _check_positions(positions, expected, attended)
    elif positions is not None:  # the model's own, counted from the shorter cache
        positions = _aligned(expected, positions.shape[:-2])
        if positions is None:
            raise ContractError("the model computed position ids of a shape the pruned prompt's positions cannot "
                                "take")
    else:
        positions = expected
    positions = positions - prefill.shift.to(positions.device)[:, None]
    if tail is not None:
        call.update(attention_mask=torch.cat([prefill.prompt_mask.to(tail.dtype), tail], dim=1))
    elif not bool(prefill.prompt_mask.all()):
        ones = prefill.prompt_mask.new_ones(prefill.prompt_mask.shape[0], cached + new)
        call.update(attention_mask=torch.cat([prefill.prompt_mask, ones], dim=1))
    return call.update(inputs_embeds=embeds, position_ids=positions)


def _new_by_positions(prefill: Prefill, positions: torch.Tensor, steps: int, cached: int, removed: int) -> int:
    """Without a mask (generate() drops an all-ones one), the count of new tokens is read from the caller's
    positions: all `steps` tokens, or the last steps - (L - L') where generate() sliced by the cache's length."""
    for new in dict.fromkeys((steps, steps - removed)):
        if new < 1:
            continue
        expected = prefill.next_position[..., None].to(positions.device) + cached + torch.arange(new, device=positions.device)
        aligned = _aligned(expected, positions.shape[:-2])
        if aligned is not None and torch.equal(positions[..., -new:], aligned.expand_as(positions[..., -new:])):
            return new
    raise InvalidInput(
        f"a decoding step after a pruned prompt got position ids {_row(positions)} that do not continue it: the "
        f"next token's position is {_row(prefill.next_position[..., None] + cached)}. Pass the position ids "
        f"generate() would (from the attention mask of the whole sequence), or none")


def _check_positions(positions: torch.Tensor, expected: torch.Tensor, attended: torch.Tensor | None) -> None:
    aligned = _aligned(expected, positions.shape[:-2])
    if aligned is not None:
        agree = positions == aligned
        if attended is not None:
            agree = agree | ~attended
        if bool(agree.all()):
            return
    raise InvalidInput(
        f"a decoding step after a pruned prompt got position ids {_row(positions)}, but the prompt implies "
        f"{_row(expected)}: pass the position ids generate() would (from the attention mask of the whole "
        f"sequence), or none")


def _aligned(expected: torch.Tensor, lead: tuple) -> torch.Tensor | None:
    """`expected` [..., B, S] in the leading shape `lead` of another set of position ids: the same rows; the
    three M-RoPE rows of a four-row (text + M-RoPE) set; or one row standing for all M-RoPE rows where they
    agree (a text token). None where it cannot be expressed."""
    have = tuple(expected.shape[:-2])
    if have == tuple(lead):
        return expected
    rope = expected[1:] if have == (4,) else expected
    if tuple(lead) == (3,) and rope.dim() == 3 and rope.shape[0] == 3:
        return rope
    if tuple(lead) in ((), (1,)):
        rows = rope.reshape(-1, *rope.shape[-2:])
        if bool((rows == rows[:1]).all()):
            return rows[0].reshape(*lead, *rows.shape[-2:])
    return None


def _row(positions: torch.Tensor) -> list:
    """The first batch row's positions, for a message."""
    return positions.reshape(-1, *positions.shape[-2:])[:, 0].tolist() if positions.dim() > 2 else positions[0].tolist()
