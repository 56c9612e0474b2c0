"""Budgets: how many visual tokens of one image reach the LLM."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidBudget, InvalidInput

# how a budget counts (prune(budget_scope=...), docs/models.md §3): over all of an image's crops, or in each
# crop on its own unpadded tokens (the image's total is then the sum over its crops)
BUDGET_SCOPES = ("per_image", "per_crop")
# how a budget counts on a video (prune(video_scope=...), docs/models.md §7): in each frame, or over the clip
VIDEO_SCOPES = ("per_frame", "per_clip")
ALLOWED = "an int >= 1 (visual tokens kept per image) or a float in (0, 1] (fraction of each image's tokens)"


@dataclass(frozen=True)
class Budget:
    """A validated per-image budget, built once where a budget enters (prune, select, configs, the CLI).

    `Budget(8)` keeps 8 tokens per image, `Budget(0.25)` a quarter of each image; Python and NumPy ints and
    floats are accepted, anything else is refused.
    """

    value: int | float  # an int: tokens kept per image; a float: the fraction of each image's tokens
    is_count: bool = field(init=False)  # compared too: Budget(1), one token, is not Budget(1.0), the whole image

    def __post_init__(self):
        budget = self.value
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
            raise InvalidBudget(f"budget must be {ALLOWED}, got {budget!r} of type {type(budget).__name__}")
        if isinstance(budget, numbers.Integral):
            value = int(budget)
            if value < 1:
                raise InvalidBudget(f"budget={budget!r} keeps no visual token; use {ALLOWED}")
        else:
            # np.float32(0.1) means 0.1, not 0.10000000149: a NumPy float is read as the decimal it prints as
            value = float(str(budget)) if isinstance(budget, np.floating) else float(budget)
            if not 0.0 < value <= 1.0:  # also refuses NaN
                raise InvalidBudget(
                    f"a float budget is the fraction of each image's tokens to keep and must lie in (0, 1], got "
                    f"{budget!r}; use an int >= 1 for a number of tokens per image"
                )
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "is_count", isinstance(value, int))

    @classmethod
    def of(cls, budget) -> Budget:
        """`budget` itself if it is a Budget, else a new one from a number."""
        return budget if isinstance(budget, Budget) else cls(budget)

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Command-line text: an int ('64') is a count, a float ('0.25', '1e-1') a fraction."""
        try:
            number = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise InvalidBudget(
                f"budget must be an int, read as tokens kept per image (e.g. 64), or a decimal number, read as the "
                f"fraction in (0, 1] of each image's tokens (e.g. 0.25), got {text!r}"
            ) from None
        return cls(number)

    def tokens_to_keep(self, num_tokens: int) -> int:
        """Tokens kept out of `num_tokens`: a count is capped at the image's size (the image stays whole),
        a fraction is rounded to the nearest count and keeps at least one token."""
        if num_tokens < 1:
            raise InvalidInput(f"an image must have at least one visual token, got {num_tokens}")
        if self.is_count:
            return min(self.value, num_tokens)
        return min(num_tokens, max(1, round(self.value * num_tokens)))

    def fraction_of(self, num_tokens: int) -> float:
        """The share of an image of `num_tokens` tokens that the budget keeps (at most the whole image)."""
        return min(1.0, self.value / num_tokens) if self.is_count else self.value

    def __str__(self) -> str:
        return str(self.value)


def check_budget_scope(scope) -> str:
    """`scope` if it is one of BUDGET_SCOPES, else a clear error."""
    if scope not in BUDGET_SCOPES:
        raise InvalidBudget(f"budget_scope must be 'per_image' (the budget counts over all of an image's crops) or "
                         f"'per_crop' (it counts in each crop, on the crop's unpadded tokens), got {scope!r}")
    return scope


def check_video_scope(scope) -> str:
    """`scope` if it is one of VIDEO_SCOPES, else a clear error."""
    if scope not in VIDEO_SCOPES:
        raise InvalidBudget(f"video_scope must be 'per_frame' (the budget counts in each frame: an int keeps that "
                            f"many tokens of every frame) or 'per_clip' (it counts over the whole video, whose "
                            f"frames compete), got {scope!r}")
    return scope
