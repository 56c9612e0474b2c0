"""The visual-information-flow objective (docs/vflowopt.md §4): how close the pruned model's last-token
representation stays to the unpruned model's.

h is the final-layer hidden state after the final norm (the lm_head input) of the last prompt token at
prefill; the objective is Σ_s cos(h_full(s), h_pruned(s)) over the calibration samples, NaN counting 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..loading import prompt_inputs
from ..models import get_adapter


@torch.inference_mode()
def last_token_states(model, processor, samples: list, batch_size: int = 16) -> torch.Tensor:
    """[S, D] final-norm hidden state of each sample's last prompt token (left-padded batches)."""
    states = []
    base = get_adapter(model).base  # the base model returns the hidden states after the final norm
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = prompt_inputs(processor, [image for image, _ in chunk], [prompt for _, prompt in chunk], model.device)
        states.append(base(**inputs, use_cache=False).last_hidden_state[:, -1].float().cpu())
    return torch.cat(states)


def flow_similarity(reference: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between unpruned and pruned last-token states; NaN counts as 0 (as the official)."""
    return torch.nan_to_num(F.cosine_similarity(reference, pruned, dim=-1), nan=0.0)


def unusable(states: torch.Tensor) -> str | None:
    """What makes reference states useless to the objective (a NaN or a zero row scores 0 whatever is pruned),
    or None when every row is finite and non-zero."""
    rows = (~torch.isfinite(states).all(dim=-1)).nonzero().flatten().tolist()
    if rows:
        return f"hold NaN or infinite values (samples {rows[:5]}{' …' if len(rows) > 5 else ''})"
    rows = (states.norm(dim=-1) == 0).nonzero().flatten().tolist()
    if rows:
        return f"are all zero (samples {rows[:5]}{' …' if len(rows) > 5 else ''})"
    return None
