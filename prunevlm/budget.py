"""Budgets: how many visual tokens of one image reach the LLM."""

from __future__ import annotations

import math
import numbers


def check_budget(budget) -> int | float:
    """Validate a budget without knowing the image: an int >= 1 or a float in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"budget must be an int (tokens kept per image) or a float in (0, 1] (fraction of each image's "
            f"tokens), got {budget!r} of type {type(budget).__name__}"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget={budget} keeps no visual token; use an int >= 1 or a float in (0, 1]")
        return int(budget)
    budget = float(budget)
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(
            f"a float budget is the fraction of each image's tokens to keep and must lie in (0, 1], got {budget}; "
            f"use an int for a token count"
        )
    return budget


def tokens_to_keep(budget, num_tokens: int) -> int:
    """Tokens kept out of `num_tokens`: an int budget is capped at the image's size (the image stays whole),
    a fraction is rounded to the nearest count and keeps at least one token."""
    budget = check_budget(budget)
    if num_tokens < 1:
        raise ValueError(f"an image must have at least one visual token, got {num_tokens}")
    if isinstance(budget, int):
        return min(budget, num_tokens)
    return min(num_tokens, max(1, round(budget * num_tokens)))
