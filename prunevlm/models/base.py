"""Model adapters: the only place that knows a model family's module paths.

An adapter says where image tokens sit, how many each image has, how to capture each signal cheaply from
the vision tower (hooks that recompute the few attention rows needed, so SDPA/FlashAttention stay on), and
which position policy the family needs.
"""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import HandleConflict, InvalidInput, Unsupported
from ..methods.base import SignalsUnavailable


class Capture:
    """Per-image signals recorded by vision-side hooks, found again by the image's own tokens.

    Each encoder call records, per image, its projected tokens ("tokens", what the LLM will receive) and the
    signals. At prefill the LLM-input hook asks for the records whose tokens equal each prompt image's rows.
    Matching by content makes the records follow whatever generate() does with encoder outputs: reuse them at
    every uncached step, repeat them for beams or several returned sequences, or drop an encoding that never
    reached the LLM. After each prefill only the records it used are kept.

    The state is per thread: generate() encodes the images outside the model's forward, so several threads
    generating on one handle each see only their own encoder calls and records (docs/architecture.md, threads).
    `scratch` is where one hook hands a value to a later hook of the same encoder call.
    """

    def __init__(self):
        self.local = threading.local()

    @property
    def calls(self) -> list[dict[str, list]]:
        if not hasattr(self.local, "calls"):
            self.local.calls = []
        return self.local.calls

    @calls.setter
    def calls(self, calls: list[dict[str, list]]) -> None:
        self.local.calls = calls

    @property
    def seconds(self) -> float:
        """Time spent computing signals in hooks since the last match()."""
        return getattr(self.local, "seconds", 0.0)

    @seconds.setter
    def seconds(self, seconds: float) -> None:
        self.local.seconds = seconds

    @property
    def scratch(self) -> dict:
        if not hasattr(self.local, "scratch"):
            self.local.scratch = {}
        return self.local.scratch

    def start_call(self) -> None:
        self.calls.append({})

    def record(self, name: str, per_image: list) -> None:
        if not self.calls:
            self.start_call()
        self.calls[-1][name] = [v.detach() if isinstance(v, torch.Tensor) else v for v in per_image]

    def clear(self) -> None:
        self.calls.clear()
        self.seconds = 0.0

    def match(self, image_tokens: list[torch.Tensor]) -> tuple[list[dict], float]:
        """The recorded signals of each image (given its tokens [N, D]), and the signal time since last call."""
        records = [{name: values[i] for name, values in call.items()}
                   for call in self.calls for i in range(len(call.get("tokens", ())))]
        by_key: dict[tuple, list[dict]] = {}
        for record in records:
            by_key.setdefault(_fingerprint(record["tokens"]), []).append(record)
        found = []
        for tokens in image_tokens:
            if not torch.isfinite(tokens.sum(dtype=torch.float32)):
                self.clear()
                raise InvalidInput("the image features contain NaN or infinite values; check the model's dtype "
                                   "(fp16 overflow?) and the pixel values")
            candidates = by_key.get(_fingerprint(tokens), [])
            record = next((r for r in candidates if _identical(r["tokens"].to(tokens), tokens)), None)
            if record is None:
                self.clear()
                raise HandleConflict(
                    "an image in the prompt was not encoded while pruning was attached, so its signals are "
                    "missing: pass pixel_values with the prompt (or compute mm_encoder_outputs after prune())"
                )
            found.append(record)
        used = {id(r) for r in found}
        kept = [r for r in records if id(r) in used]
        # images and videos may record different signals (a video's frames): None where a record has none
        names = {name for record in kept for name in record}
        self.calls = [{name: [r.get(name) for r in kept] for name in names}] if kept else []
        seconds, self.seconds = self.seconds, 0.0
        return found, seconds


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal; through NumPy on the CPU, where it is 4x faster for [576, 1024] fp32 tokens."""
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float16, torch.float64):
        return np.array_equal(a.detach().numpy(), b.detach().numpy())
    return torch.equal(a, b)


def _fingerprint(tokens: torch.Tensor) -> tuple:
    return tuple(tokens.shape), round(float(tokens[:, :8].detach().double().sum()), 3)


class Timer:
    """Adds the wall time of a block to `capture.seconds` (synchronising CUDA so the time is real)."""

    def __init__(self, capture: Capture, device: torch.device):
        self.capture, self.device = capture, device

    def __enter__(self):
        synchronize(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        synchronize(self.device)
        self.capture.seconds += time.perf_counter() - self.start


class InstanceAttribute:
    """Shadows `obj.name` with `value` until `remove()`, like a hook handle (for the one place no hook can
    see an argument: see llava_next.py)."""

    def __init__(self, obj, name: str, value):
        if name in vars(obj):
            raise HandleConflict(f"{type(obj).__name__}.{name} is already replaced on this instance (by another "
                                 f"library?): prunevlm wraps the model's own; prune a model whose {name} is its class's")
        self.obj, self.name = obj, name
        setattr(obj, name, value)

    def remove(self) -> None:
        if self.name in vars(self.obj):
            delattr(self.obj, self.name)


def encoded_counts(kwargs: dict, kind: str) -> list[int] | None:
    """Placeholders per image or video ("image", "video") from the encoder outputs generate() passes instead of
    pixels and grids (docs/models.md §7); None where the call carries none."""
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get(kind)
    return None if encoded is None else [int(features.shape[0]) for features in encoded.pooler_output]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (a no-op on the CPU)."""
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

    def why_unavailable(self, names: set[str]) -> str:
        """Why this instance cannot give the signals `names` although its family can (for the refusal), or ""."""
        return ""

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

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def image_token_counts(self, kwargs: dict) -> list[int]:
        """Tokens per image for the images in a base-model call or a processor's inputs (from encoder outputs
        or pixel inputs)."""
        raise NotImplementedError

    def image_grids(self, inputs: dict) -> list[tuple[int, int]]:
        """The token grid (rows, columns) of each picture of a processor's inputs' images (one per image, or
        one per plane: `picture_cells`), row-major as the LLM gets them."""
        raise NotImplementedError

    def pixel_views(self, inputs: dict) -> list[torch.Tensor]:
        """Each picture as the vision tower saw it: [3, H, W], still normalised, with its token grid
        (`image_grids`) covering it evenly (for drawing the kept tokens)."""
        raise NotImplementedError

    def picture_cells(self, inputs: dict) -> list[tuple[int, str, torch.Tensor]]:
        """Per picture: the image it shows, what part of it the picture is (for its caption) and, per cell of
        its grid (row-major), the index within the image of the token drawn there. Default: one picture per
        image, cell i showing token i."""
        return [(image, "the image", torch.arange(rows * cols)) for image, (rows, cols) in enumerate(self.image_grids(inputs))]

    @property
    def video_token_id(self) -> int | None:
        """The placeholder id of video tokens; None for a family whose videos prunevlm does not prune."""
        return None

    def video_token_counts(self, kwargs: dict) -> list[int]:
        """Placeholders per video for the videos in a base-model call (from encoder outputs or pixel inputs),
        the way `image_token_counts` counts images; none for a family without video."""
        return []

    def video_views(self, inputs: dict) -> list[tuple[list[torch.Tensor], tuple[int, int]]]:
        """Per video of a processor's inputs: each frame as the vision tower saw it ([3, H, W], still
        normalised) and the token grid of a frame covering it evenly (for drawing a film strip); none for a
        family without video."""
        return []

    def check_inputs(self, kwargs: dict) -> None:
        """Refuse inputs the adapter cannot prune with a clear error: here, a video on a family without video
        support (docs/models.md §7)."""
        if self.video_token_id is None and (kwargs.get("pixel_values_videos") is not None
                                            or encoded_counts(kwargs, "video") is not None):
            raise Unsupported(f"prunevlm prunes videos on Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision, not on "
                              f"{self.family}; remove the pruning handle (handle.remove()) for video prompts")

    def install(self, needed: set[str], capture: Capture) -> list:
        """Register vision-side hooks recording, per image, its projected tokens and the needed signals;
        return the hook handles."""
        raise NotImplementedError

    @property
    def first_stage_layer(self) -> int:
        """The lowest LLM layer an in-LLM stage may start at (Qwen3-VL adds DeepStack features below it)."""
        return 0

    def narrow_llm_inputs(self, kwargs: dict, flat_source: torch.Tensor, kept: torch.Tensor) -> dict:
        """Updates for the language model's family-specific per-position inputs after pruning the prefill:
        `flat_source` [B·L'] is the flattened original position (row·L + column) of each new position, `kept`
        [B·L'] whether it holds a token (not padding). Default: none."""
        return {}

    # -- LLM-side signals of in-LLM stages (methods/base.py::LLM_SIGNALS) ---------------------------------

    def check_llm_signals(self, names: tuple[str, ...]) -> None:
        """Refuse LLM-side signals this family's decoder cannot give cheaply, with the reason."""
        if {"last_attention", "layer_queries", "layer_keys"} & set(names):
            attention = self.decoder_layers()[0].self_attn
            if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
                raise SignalsUnavailable(
                    f"the {self.family} decoder's attention ({type(attention).__name__}) is not a q/k projection "
                    f"with rotary positions, so its attention cannot be recomputed from it: use a method that prunes "
                    f"at the LLM input")

    def queries_and_keys(self, layer: int, hidden: torch.Tensor, position_embeddings,
                         last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer `layer`'s post-RoPE queries times its attention scaling ([B, H, L, d_h]; [B, H, 1, d_h]
        for the last position alone) and keys repeated per query head ([B, H, L, d_h]), fp32, recomputed from
        its input `hidden` [B, L, D]: its input norm, q/k projections (and per-head q/k norms where the family
        has them) and the rotary `position_embeddings`
        (cos, sin) [B, L, d_h] the layer receives."""
        block = self.decoder_layers()[layer]
        attention = block.self_attn
        x = block.input_layernorm(hidden)
        batch, length, _ = x.shape
        size = attention.head_dim
        rows = x[:, -1:] if last_only else x
        query = attention.q_proj(rows).view(batch, rows.shape[1], -1, size)
        keys = attention.k_proj(x).view(batch, length, -1, size)
        if hasattr(attention, "q_norm"):  # per-head norms before the rotary embedding (Qwen3)
            query, keys = attention.q_norm(query), attention.k_norm(keys)
        query, keys = query.transpose(1, 2), keys.transpose(1, 2)
        cos, sin = (p[:, None] for p in position_embeddings)
        query = (query * cos[:, :, -rows.shape[1]:] + _rotate_half(query) * sin[:, :, -rows.shape[1]:]).float()
        keys = (keys * cos + _rotate_half(keys) * sin).float()
        return query * attention.scaling, keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)

    def last_attention(self, layer: int, hidden: torch.Tensor, position_embeddings, mask: torch.Tensor) -> torch.Tensor:
        """[B, H, L] the last position's per-head softmax attention over all keys at decoder layer `layer`, from
        `queries_and_keys` for that one row; keys where `mask` [B, L] is 0 get none. SDPA stays on."""
        query, keys = self.queries_and_keys(layer, hidden, position_embeddings, last_only=True)
        logits = (query @ keys.transpose(-1, -2))[:, :, 0]  # [B, H, L]
        return logits.masked_fill(~mask.bool()[:, None], -torch.inf).softmax(dim=-1)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's last norm (the one before the LM head) applied to `hidden`."""
        return self.language_model.norm(hidden)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's pair rotation, as LLaMA-style decoders apply it (first half with second half)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
