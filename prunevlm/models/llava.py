"""LLaVA (`LlavaForConditionalGeneration`) with a CLIP tower that has a CLS token (LLaVA-1.5 style)."""

from __future__ import annotations

import torch

from ..errors import Unsupported
from ..signals.attention import attention_probs
from .base import Adapter, Capture, Timer, encoded_counts


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    provides = frozenset({"image_tokens", "text_embeds", "text_mask", "features", "saliency", "attention", "keys",
                          "patches", "grid", "planes"})
    # the vision tower and feature selection the adapter handles (its saliency reads the CLS row)
    tower_model_type, tower_name = "clip_vision_model", "a CLIP vision tower (CLS token)"
    select_strategy, strategy_meaning = "default", "CLS dropped, patch tokens only"

    def check_supported(self) -> None:
        config = self.config
        vision = config.vision_config
        if vision.model_type != self.tower_model_type:
            raise Unsupported(
                f"prunevlm supports {self.family} with {self.tower_name}; this model's tower is {vision.model_type!r}"
            )
        if config.vision_feature_select_strategy != self.select_strategy:
            raise Unsupported(
                f"prunevlm supports {self.family} with vision_feature_select_strategy={self.select_strategy!r} "
                f"({self.strategy_meaning}); this model uses {config.vision_feature_select_strategy!r}"
            )
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or layer == 0:
            raise Unsupported(f"prunevlm supports one vision feature layer other than the embeddings; got {layer!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid (rows, columns) of every image: the tower's fixed input size over its patch size."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return side, side

    @property
    def feature_layer(self) -> int:
        """Index of the encoder layer whose output is the image feature: hidden_states[i] is layer i-1's output."""
        layer = self.config.vision_feature_layer
        num_layers = len(self.base.vision_tower.encoder.layers)
        return num_layers + layer if layer < 0 else layer - 1

    def image_token_counts(self, kwargs: dict) -> list[int]:
        counts = encoded_counts(kwargs, "image")
        if counts is not None:
            return counts
        pixels = kwargs.get("pixel_values")
        if pixels is None:
            return []
        return [self.grid[0] * self.grid[1]] * int(pixels.shape[0])

    def image_grids(self, inputs: dict) -> list[tuple[int, int]]:
        pixels = inputs.get("pixel_values")
        return [] if pixels is None else [self.grid] * int(pixels.shape[0])

    def pixel_views(self, inputs: dict) -> list[torch.Tensor]:
        return list(inputs["pixel_values"])

    def install(self, needed: set[str], capture: Capture) -> list:
        tower = self.base.vision_tower

        def start(module, args, kwargs):
            pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
            capture.start_call()
            capture.record("grid", [self.grid] * pixels.shape[0])
            capture.record("planes", [(self.grid,)] * pixels.shape[0])
            if "patches" in needed:
                capture.record("patches", list(self.patches_of(pixels)))

        projector = self.base.multi_modal_projector
        handles = [tower.register_forward_pre_hook(start, with_kwargs=True),
                   projector.register_forward_hook(lambda module, args, output: capture.record("tokens", list(output)))]
        if needed & {"saliency", "attention", "keys"}:
            handles += self.query_key_hooks(capture, lambda attn, q, k: self._record_attention(attn, q, k, needed, capture))
        if "features" in needed:

            def record_features(module, args):
                capture.record("features", list(args[0]))

            handles.append(projector.register_forward_pre_hook(record_features))
        return handles

    def patches_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pixels under each patch token of each crop: [n, C, H, W] -> [n, T, C, p, p], row-major."""
        side = self.config.vision_config.patch_size
        blocks = pixels.unfold(2, side, side).unfold(3, side, side)  # [n, C, rows, cols, p, p]
        return blocks.permute(0, 2, 3, 1, 4, 5).flatten(1, 2)

    def query_key_hooks(self, capture: Capture, use) -> list:
        """Hooks that hand the feature layer's own query and key projections, as they are computed (no
        recomputation), to `use(attention module, queries, keys)`, timed as signal time."""
        attention = self.base.vision_tower.encoder.layers[self.feature_layer].self_attn
        def keep_queries(module, args, output):
            capture.scratch["queries"] = output

        def use_keys(module, args, keys):
            with torch.no_grad(), Timer(capture, keys.device):
                use(attention, capture.scratch.pop("queries"), keys)

        return [attention.q_proj.register_forward_hook(keep_queries), attention.k_proj.register_forward_hook(use_keys)]

    def _record_attention(self, attn, queries: torch.Tensor, keys: torch.Tensor, needed: set[str], capture: Capture) -> None:
        """CLS->patch attention (the VisPruner/FasterVLM saliency), the patch-to-patch map and the patches'
        head-averaged keys (VisionZip's merge metric), each if needed."""
        batch, length, _ = keys.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        keys = keys.view(batch, length, heads, head_dim)
        if "keys" in needed:
            capture.record("keys", list(keys[:, 1:].float().mean(dim=2)))
        if not needed & {"saliency", "attention"}:
            return
        keys = keys.transpose(1, 2)
        rows = queries if "attention" in needed else queries[:, :1]
        rows = rows.reshape(batch, rows.shape[1], heads, head_dim).transpose(1, 2)
        probs = attention_probs(rows, keys, attn.scale)  # [B, Q, 1 + N]
        if "saliency" in needed:
            capture.record("saliency", list(probs[:, 0, 1:]))
        if "attention" in needed:
            capture.record("attention", list(probs[:, 1:, 1:]))
