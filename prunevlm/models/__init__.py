"""Adapters per model family, chosen from the model class."""

from __future__ import annotations

from torch import nn

from ..errors import Unsupported

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen2_vl import Qwen3VLAdapter, QwenVLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, QwenVLAdapter, Qwen3VLAdapter)


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`'s class, or a clear error listing what is supported."""
    return adapter_class(type(model).__name__)(model)


def adapter_class(model_class: str) -> type[Adapter]:
    """The adapter for a model class name (also before the model is built), or a clear error."""
    for adapter in ADAPTERS:
        if model_class in adapter.model_classes:
            return adapter
    raise Unsupported(
        f"prunevlm does not support {model_class}; supported model classes: {', '.join(supported_models())}"
    )


__all__ = ["ADAPTERS", "Adapter", "adapter_class", "get_adapter", "supported_models"]
