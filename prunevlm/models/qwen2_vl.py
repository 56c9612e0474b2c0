"""Qwen2-VL and Qwen2.5-VL: no CLS token, 2x2 patch merger, M-RoPE positions, windowed vision attention (2.5)."""

from __future__ import annotations

import sys

import torch

from ..signals.attention import pool_groups, received_attention
from .base import Adapter, Capture, Timer


class QwenVLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
    )
    provides = frozenset({"image_tokens", "text_embeds", "text_mask", "saliency", "grid"})
    compact_positions = False  # M-RoPE positions encode the image grid; they must stay original

    @property
    def visual(self):
        return self.base.visual

    @property
    def merge(self) -> int:
        return self.visual.spatial_merge_size

    @property
    def saliency_block(self) -> int:
        """The last full-attention vision block (Qwen2.5-VL windows the others; flashvlm.md §1.4)."""
        full = getattr(self.visual, "fullatt_block_indexes", None)
        return max(full) if full else len(self.visual.blocks) - 1

    def image_token_counts(self, kwargs: dict) -> list[int]:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return [int(features.shape[0]) for features in encoded.pooler_output]
        grid_thw = kwargs.get("image_grid_thw")
        if kwargs.get("pixel_values") is None or grid_thw is None:
            return []
        return [int(n) for n in (grid_thw.prod(dim=-1) // self.merge**2).tolist()]

    def check_inputs(self, kwargs: dict) -> None:
        if kwargs.get("pixel_values_videos") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None:
            raise NotImplementedError(
                "prunevlm does not prune Qwen video inputs yet; remove the pruning handle (handle.remove()) for "
                "video prompts"
            )

    def install(self, needed: set[str], capture: Capture) -> list:
        state = {}

        def start(module, args, kwargs):
            grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            state["grid_thw"] = grid_thw
            capture.start_call()
            capture.record("grid", [(int(h) // self.merge, int(w) // self.merge) for _, h, w in grid_thw.tolist()])

        handles = [self.visual.register_forward_pre_hook(start, with_kwargs=True)]
        if "saliency" in needed:
            attention = self.visual.blocks[self.saliency_block].attn

            def keep_layout(module, args, kwargs):
                state["cu_seqlens"], state["rotary"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]

            def record_saliency(module, args, qkv):
                # the block's own q/k projections, read as they are computed: no recomputation
                with torch.no_grad(), Timer(capture, qkv.device):
                    saliency = self._received_attention(attention, qkv, state["cu_seqlens"], state["rotary"])
                    saliency = saliency[self._inverse_window_order(state["grid_thw"])]
                    counts = (state["grid_thw"].prod(dim=-1) // self.merge**2).tolist()
                    capture.record("saliency", list(saliency.split(counts)))

            handles.append(attention.register_forward_pre_hook(keep_layout, with_kwargs=True))
            handles.append(attention.qkv.register_forward_hook(record_saliency))
        return handles

    def _received_attention(self, attn, qkv, cu_seqlens, position_embeddings) -> torch.Tensor:
        """Per merged token: attention received in this block (Σ over queries, head mean) averaged over its
        2x2 patches, computed image by image (the official code mixes images; flashvlm.md §1.10.3)."""
        length = qkv.shape[0]
        qkv = qkv.reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        queries, keys = rotate(qkv[0], qkv[1], *position_embeddings)
        queries, keys = queries.transpose(0, 1), keys.transpose(0, 1)  # [H, S, d]
        bounds = cu_seqlens.tolist()
        received = torch.cat([
            received_attention(queries[:, start:end], keys[:, start:end], attn.scaling)
            for start, end in zip(bounds[:-1], bounds[1:])
        ])
        return pool_groups(received, self.merge**2)

    def _inverse_window_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Map from original merged-token order to the (windowed) order the blocks see; identity for Qwen2-VL."""
        total = int((grid_thw.prod(dim=-1) // self.merge**2).sum())
        if not hasattr(self.visual, "fullatt_block_indexes"):
            return torch.arange(total, device=grid_thw.device)
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.merge, window_size=self.visual.window_size, patch_size=self.visual.patch_size
        )
        return torch.argsort(window_index.to(grid_thw.device))

    def after_prefill(self, removed_tokens: int) -> None:
        # A caller that decodes without position ids gets them from the cache length + rope_deltas; the cache
        # is shorter by the pruned count, so the delta grows by it (transformers-integration.md §3.4 A2).
        if self.base.rope_deltas is not None:
            self.base.rope_deltas = self.base.rope_deltas + removed_tokens
