"""Model adapters: the only place that knows a model family's module paths.

An adapter says where image tokens sit, how many each image has, how to capture each signal cheaply from
the vision tower (hooks that recompute the few attention rows needed, so SDPA/FlashAttention stay on), and
which position policy the family needs.
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch
from torch import nn


class Capture:
    """Per-image signals recorded by vision-side hooks, grouped by vision call, in encoding order."""

    def __init__(self):
        self.calls: list[dict[str, list]] = []
        self.seconds = 0.0  # time spent computing signals in hooks since the last take()

    def start_call(self) -> None:
        self.calls.append({})

    def record(self, name: str, per_image: list) -> None:
        if not self.calls:
            self.start_call()
        self.calls[-1][name] = list(per_image)

    def clear(self) -> None:
        self.calls.clear()
        self.seconds = 0.0

    def take(self, num_images: int) -> tuple[list[dict], float]:
        """The per-image signals of the most recent calls that together encoded `num_images` images.

        Older records are stale (an encoder call whose images never reached the LLM) and are dropped.
        """
        seconds = self.seconds
        images: list[dict] = []
        for call in reversed(self.calls):
            if len(images) >= num_images:
                break
            count = max((len(v) for v in call.values()), default=0)
            images = [{name: values[i] for name, values in call.items()} for i in range(count)] + images
        self.clear()
        if len(images) != num_images:
            raise RuntimeError(
                f"the prompt holds {num_images} image(s) but the vision hooks recorded {len(images)}. Pass the "
                f"images (pixel_values) in the same call as the prompt, or compute mm_encoder_outputs while "
                f"pruning is attached."
            )
        return images, seconds


class Timer:
    """Adds the wall time of a block to `capture.seconds` (synchronising CUDA so the time is real)."""

    def __init__(self, capture: Capture, device: torch.device):
        self.capture, self.device = capture, device

    def __enter__(self):
        _sync(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        _sync(self.device)
        self.capture.seconds += time.perf_counter() - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Adapter:
    """Base class; see `llava.py` and `qwen2_vl.py`."""

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]  # class names handled (outer model and base model)
    provides: ClassVar[frozenset[str]]  # signals this family can give
    compact_positions: ClassVar[bool] = True  # whether positions="compact" makes sense (not for M-RoPE)

    def __init__(self, model: nn.Module):
        self.model = model  # as the user gave it: the generation class or its base model
        self.base = model if hasattr(model, "language_model") else model.model
        self.language_model = self.base.language_model
        self.check_supported()

    def check_supported(self) -> None:
        """Raise if this instance has a configuration the adapter does not handle."""

    @property
    def config(self):
        return self.base.config

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def image_token_counts(self, kwargs: dict) -> list[int]:
        """Tokens per image for the images in a base-model call (from encoder outputs or pixel inputs)."""
        raise NotImplementedError

    def check_inputs(self, kwargs: dict) -> None:
        """Refuse inputs the adapter cannot prune (e.g. video) with a clear error."""

    def install(self, needed: set[str], capture: Capture) -> list:
        """Register vision-side hooks recording the needed signals; return the hook handles."""
        raise NotImplementedError

    def after_prefill(self, removed_tokens: int) -> None:
        """Family-specific bookkeeping after the prompt lost `removed_tokens` columns (e.g. M-RoPE deltas)."""
