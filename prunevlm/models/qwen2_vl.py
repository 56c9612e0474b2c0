"""Qwen2-VL and Qwen2.5-VL: no CLS token, 2x2 patch merger, M-RoPE positions, windowed vision attention (2.5)."""

from __future__ import annotations

import sys

import torch

from ..signals.attention import attention_map, pool_groups, received_attention
from .base import Adapter, Capture, Timer, encoded_counts


class QwenVLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
    )
    family_signals = frozenset({"image_tokens", "text_embeds", "text_mask", "saliency", "attention", "keys", "patches",
                                "grid", "planes", "frames"})
    attention_signals = frozenset({"saliency", "attention", "keys"})  # read from a full-attention vision block
    compact_positions = False  # M-RoPE positions encode the image grid; they must stay original

    @property
    def provides(self) -> frozenset[str]:
        """Every signal, but those read from a full-attention block where the tower has none (see below)."""
        return self.family_signals if self.full_attention_blocks else self.family_signals - self.attention_signals

    def why_unavailable(self, names: set[str]) -> str:
        if names & self.attention_signals and not self.full_attention_blocks:
            return (f"its vision tower windows every block: fullatt_block_indexes "
                    f"{list(self.visual.fullatt_block_indexes)} name none of its {len(self.visual.blocks)} blocks "
                    f"(transformers skips such indexes), so no attention over a whole image exists to read; use a "
                    f"method without attention signals (random, uniform, divprune)")
        return ""

    @property
    def visual(self):
        return self.base.visual

    @property
    def merge(self) -> int:
        return self.visual.spatial_merge_size

    @property
    def full_attention_blocks(self) -> list[int]:
        """The vision blocks that attend over whole images: every block of Qwen2-VL and Qwen3-VL; on Qwen2.5-VL
        those of `fullatt_block_indexes` within the tower's depth, as transformers reads them (an index past
        the depth names no block: transformers' own tiny test config names 7, 15, 23, 31 on a depth of 2)."""
        depth = len(self.visual.blocks)
        full = getattr(self.visual, "fullatt_block_indexes", None)
        return list(range(depth)) if full is None else sorted(i for i in full if 0 <= i < depth)

    @property
    def saliency_block(self) -> int:
        """The last full-attention vision block (Qwen2.5-VL windows the others; docs/flashvlm.md §4)."""
        return max(self.full_attention_blocks)

    def image_token_counts(self, kwargs: dict) -> list[int]:
        return self._token_counts(kwargs, "image", "pixel_values", "image_grid_thw")

    def _token_counts(self, kwargs: dict, kind: str, pixels: str, grids: str) -> list[int]:
        """Placeholders per image or video: from the encoder's outputs where generate() passes those (without
        the grids), else from the grids of the pixels."""
        counts = encoded_counts(kwargs, kind)
        if counts is not None:
            return counts
        grid_thw = kwargs.get(grids)
        if kwargs.get(pixels) is None or grid_thw is None:
            return []
        return [int(n) for n in (grid_thw.prod(dim=-1) // self.merge**2).tolist()]

    def image_grids(self, inputs: dict) -> list[tuple[int, int]]:
        grid_thw = inputs.get("image_grid_thw")
        return [] if grid_thw is None else [(int(h) // self.merge, int(w) // self.merge) for _, h, w in grid_thw.tolist()]

    def pixel_views(self, inputs: dict) -> list[torch.Tensor]:
        """The processor's flattened patches laid back on each image's grid (first temporal frame)."""
        views = []
        for blocks, (rows, cols) in zip(self._patches(inputs["pixel_values"], inputs["image_grid_thw"]), self.image_grids(inputs)):
            channels, side = blocks.shape[1], blocks.shape[-1]
            views.append(blocks.reshape(rows, cols, channels, side, side).permute(2, 0, 3, 1, 4).reshape(channels, rows * side, cols * side))
        return views

    def video_views(self, inputs: dict) -> list[tuple[list[torch.Tensor], tuple[int, int]]]:
        """Per video, each temporal patch's first frame laid back on its grid (as `pixel_views` for images)."""
        grid_thw = inputs["video_grid_thw"]
        views = []
        for blocks, (frames, height, width) in zip(self._patches(inputs["pixel_values_videos"], grid_thw), grid_thw.tolist()):
            rows, cols = height // self.merge, width // self.merge
            channels, side = blocks.shape[1], blocks.shape[-1]
            strip = blocks.reshape(frames, rows, cols, channels, side, side).permute(0, 3, 1, 4, 2, 5)
            views.append((list(strip.reshape(frames, channels, rows * side, cols * side)), (rows, cols)))
        return views

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    def video_token_counts(self, kwargs: dict) -> list[int]:
        return self._token_counts(kwargs, "video", "pixel_values_videos", "video_grid_thw")

    def install(self, needed: set[str], capture: Capture) -> list:
        def start(module, args, kwargs):
            grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            capture.scratch["grid_thw"] = grid_thw
            capture.start_call()
            grids = self.image_grids({"image_grid_thw": grid_thw})
            capture.record("grid", grids)  # one frame's grid (an image is one frame)
            capture.record("planes", [(grid,) for grid in grids])
            # every encoded item as t frames (a temporal patch each); the runtime gives it to videos only
            capture.record("frames", [(int(t), rows, cols) for (t, _, _), (rows, cols) in zip(grid_thw.tolist(), grids)])

        def record_tokens(module, args, kwargs, output):
            counts = (capture.scratch["grid_thw"].prod(dim=-1) // self.merge**2).tolist()
            capture.record("tokens", list(output.pooler_output.split(counts)))

        handles = [self.visual.register_forward_pre_hook(start, with_kwargs=True),
                   self.visual.register_forward_hook(record_tokens, with_kwargs=True)]
        if "patches" in needed:
            handles.append(self.visual.register_forward_pre_hook(
                lambda module, args, kwargs: capture.record("patches", self._patches(args[0], capture.scratch["grid_thw"])),
                with_kwargs=True))
        if needed & {"saliency", "attention", "keys"}:
            attention = self.visual.blocks[self.saliency_block].attn

            def keep_layout(module, args, kwargs):
                capture.scratch["cu_seqlens"], capture.scratch["rotary"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]

            def record(module, args, qkv):
                # the block's own q/k projections, read as they are computed: no recomputation
                with torch.no_grad(), Timer(capture, qkv.device):
                    signals = self._attention_signals(attention, qkv, capture.scratch, needed)
                for name, per_image in signals.items():
                    capture.record(name, per_image)

            handles.append(attention.register_forward_pre_hook(keep_layout, with_kwargs=True))
            handles.append(attention.qkv.register_forward_hook(record))
        return handles

    def _patches(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """The pixels under each merged token (first temporal frame): [N_i, C, merge·P, merge·P] per image."""
        config = self.visual.config
        channels, frames, side = config.in_channels, config.temporal_patch_size, config.patch_size
        merge = self.merge
        blocks = pixels.reshape(-1, channels, frames, side, side)[:, :, 0]
        blocks = blocks.reshape(-1, merge, merge, channels, side, side).permute(0, 3, 1, 4, 2, 5)
        blocks = blocks.reshape(-1, channels, merge * side, merge * side)
        return list(blocks.split((grid_thw.prod(dim=-1) // merge**2).tolist()))

    def _attention_signals(self, attn, qkv, state: dict, needed: set[str]) -> dict[str, list]:
        """Per image, in original token order: the attention each merged token receives (Σ over queries,
        head mean, averaged over its 2x2 patches; docs/flashvlm.md §4) and, if needed, the merged-token map
        (rows: mean over a token's patches as queries, columns: sum over its patches as keys), and the keys
        before the rotary embedding, averaged over heads and over each token's patches (VisionZip's merge
        metric). Computed frame by frame, as the tower's own attention splits its sequence by temporal patch on the host
(images differ in size; each pass is an N_i x N_i product, so the loop's overhead is small beside it); the
official code mixes images (docs/flashvlm.md §8)."""
        length = qkv.shape[0]
        qkv = qkv.reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        content_keys = qkv[1].float().mean(dim=1)  # [S, d]
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        queries, keys = rotate(qkv[0], qkv[1], *state["rotary"])
        queries, keys = queries.transpose(0, 1), keys.transpose(0, 1)  # [H, S, d]
        group = self.merge**2
        order = self._window_position(state["grid_thw"])
        segments = {name: [] for name in ("saliency", "attention", "keys") if name in needed}
        bounds = state["cu_seqlens"].tolist()
        offset = 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            count = (end - start) // group
            local = order[offset : offset + count] - offset
            q, k = queries[:, start:end], keys[:, start:end]
            if "attention" in needed:
                full = attention_map(q, k, attn.scaling)
                received = full.sum(dim=0)
                merged = pool_groups(pool_groups(full, group, dims=(-1,)) * group, group, dims=(-2,))
                segments["attention"].append(merged[local][:, local])
            elif "saliency" in needed:
                received = received_attention(q, k, attn.scaling)
            if "saliency" in needed:
                segments["saliency"].append(pool_groups(received, group)[local])
            if "keys" in needed:
                segments["keys"].append(pool_groups(content_keys[start:end], group, dims=(0,))[local])
            offset += count
        # the tower attends within each temporal patch: a video's frames are segments of their own, joined
        # here in time order (its attention map is block-diagonal: no frame attends to another)
        frames = state["grid_thw"][:, 0].tolist()
        starts = [sum(frames[:i]) for i in range(len(frames))]
        join = {"attention": torch.block_diag}
        return {name: [join.get(name, lambda *parts: torch.cat(parts))(*per_frame[first : first + count])
                       for first, count in zip(starts, frames)]
                for name, per_frame in segments.items()}

    def _window_position(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """For each merged token in original order, its position in the (windowed) order the blocks see;
        the identity for Qwen2-VL."""
        total = int((grid_thw.prod(dim=-1) // self.merge**2).sum())
        if not hasattr(self.visual, "fullatt_block_indexes"):
            return torch.arange(total, device=grid_thw.device)
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.merge, window_size=self.visual.window_size, patch_size=self.visual.patch_size
        )
        return torch.argsort(window_index.to(grid_thw.device))


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen2-VL's packing and interleaved M-RoPE, plus DeepStack: features of vision blocks added to
    the hidden states at the visual positions after LLM layers 0 .. n−1 (docs/models.md §5). Pruning at the
    LLM input subsets those rows and `visual_pos_masks` with the kept positions; an in-LLM stage must start at
    layer n or later, where every DeepStack feature has been added."""

    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")

    @property
    def first_stage_layer(self) -> int:
        return len(self.visual.deepstack_visual_indexes)

    def narrow_llm_inputs(self, kwargs: dict, flat_source: torch.Tensor, kept: torch.Tensor) -> dict:
        visual = kwargs.get("visual_pos_masks")
        if visual is None:
            return {}
        flat = visual.flatten()
        rank = torch.cumsum(flat.long(), dim=0) - 1  # each visual position's row in the DeepStack features
        new_visual = flat.index_select(0, flat_source) & kept
        rows = rank.index_select(0, flat_source)[new_visual]
        embeds = kwargs.get("deepstack_visual_embeds")
        return {"visual_pos_masks": new_visual.view(visual.shape[0], -1),
                "deepstack_visual_embeds": None if embeds is None else [e.index_select(0, rows) for e in embeds]}
