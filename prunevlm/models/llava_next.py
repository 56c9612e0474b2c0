"""LLaVA-NeXT (AnyRes, CLIP tower with CLS) and LLaVA-OneVision (SigLIP tower, no CLS, `anyres_max_9`).

An image reaches the LLM *packed* (docs/models.md §1): the base crop's tokens in raster order, then the
tiles stitched into one plane, unpadded, with the learned `image_newline` after every plane row (OneVision
also downscales a large plane bilinearly). A tile's tokens are not contiguous there, and the newlines carry
no image content. Every per-crop signal is therefore sent through the model's own `pack_image_features`,
so that it lines up row for row with the placeholders; a small coordinate tensor packed the same way
tells, for every placeholder, its crop, plane row and column, and whether it is a newline (docs/models.md
§2). Newlines never compete in a selection: the adapter records which placeholders are candidates and the
plane row of each, and the runtime keeps newlines by its `newline` policy.

VFlowOpt's signals are per-crop values packed the same way (docs/models.md §3, docs/vflowopt.md §5): each
crop's pixel blocks, and per token the attention it receives within its crop with that crop's received
attention, so the method takes the context relevance within each token's crop. Pictures are drawn per
plane from the packed pixel blocks.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import InvalidInput
from ..signals.attention import attention_probs, received_attention
from .base import Capture, InstanceAttribute, encoded_counts
from .llava import LlavaAdapter

# channels of the packed coordinate tensor; a newline packs as all zeros (content 0)
CROP, ROW, COLUMN, CONTENT = range(4)
UNPACKED = "per crop "  # prefix of a signal recorded per crop, packed per image at the projector
# what each plane of a picture is (handle.draw's captions)
PLANE_NAMES = ("the base crop (the whole image, resized)", "the tile plane (its tiles stitched, padding cut)")


def crop_attention(attention: torch.Tensor) -> torch.Tensor:
    """VFlowOpt's per-token view of each crop's map A [n, T, T] (rows: queries): per token j, A_gj over the
    crop's tokens g, and the attention r_g each of them receives (the column means), so that packing it like
    the features lets c_j be computed within the token's crop (methods/vflowopt.py). -> [n, T, 2, T]."""
    received = attention.mean(dim=1)
    return torch.stack([attention.transpose(1, 2), received[:, None].expand_as(attention)], dim=2)


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    # two planes (base crop, unpadded tile plane) but no single token grid, and no patch-to-patch map across
    # crops: each token's attention within its own crop instead (crop_attention, docs/models.md §3)
    provides = frozenset({"image_tokens", "text_embeds", "text_mask", "features", "saliency", "keys", "planes",
                          "crop_attention", "patches"})

    def __init__(self, model):
        super().__init__(model)
        self.layouts: dict[tuple, list[torch.Tensor]] = {}  # layout() per (image sizes, images per prompt)

    # -- packing ------------------------------------------------------------------------------------

    def crops(self, image_sizes: torch.Tensor, batch_num_images=None) -> list[int]:
        """Crops per image, as `get_image_features` splits the tower's output."""
        tile = self.config.vision_config.image_size
        return [image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=tile)
                for size in image_sizes]

    def pack(self, per_crop: torch.Tensor, image_sizes, batch_num_images=None, newline=None) -> list[torch.Tensor]:
        """Per-crop values [n_crops, T, C] of all images -> per image [placeholders, C]; newlines are `newline`
        (zeros by default)."""
        values = list(per_crop.split(self.crops(image_sizes, batch_num_images)))
        if newline is None:
            newline = torch.zeros(per_crop.shape[-1], dtype=per_crop.dtype, device=per_crop.device)
        return self._pack_call(values, image_sizes, newline)

    def _pack_call(self, values, image_sizes, newline):
        packed, _ = self.base.pack_image_features(values, image_sizes, self.config.vision_feature_select_strategy,
                                                  image_newline=newline)
        return packed

    def layout(self, image_sizes, batch_num_images=None) -> list[torch.Tensor]:
        """Per image [placeholders, 4], the model's packing applied to coordinates: the crop, the row and the
        column within the crop (fractional after OneVision's downscale), and 1 for image content, 0 for a
        newline."""
        sizes = image_sizes.cpu()
        key = (tuple(map(tuple, sizes.tolist())), None if batch_num_images is None else tuple(map(int, batch_num_images)))
        if key not in self.layouts:  # asked when the images are located and again when they are packed
            side = self.grid[0]
            index = torch.arange(side * side, dtype=torch.float32)
            crop = torch.cat([torch.arange(count, dtype=torch.float32) for count in self.crops(sizes, batch_num_images)])
            per_crop = torch.stack(torch.broadcast_tensors(
                crop[:, None], (index // side)[None], (index % side)[None], torch.ones(1, 1)), dim=-1)
            self.layouts = {key: self.pack(per_crop, sizes, batch_num_images)}
        return self.layouts[key]

    def planes(self, layout: torch.Tensor) -> tuple[tuple[int, int], ...]:
        """The candidates (content placeholders) as row-major planes: the base crop, then the tile plane (its
        rows are the newlines' count; a single-crop image is its base crop alone)."""
        side = self.grid[0]
        content = int((layout[:, CONTENT] > 0.5).sum())
        if content == side * side:
            return ((side, side),)
        rows = int((layout[:, CONTENT] < 0.5).sum())
        return (side, side), (rows, (content - side * side) // rows)

    @staticmethod
    def newline_rows(layout: torch.Tensor) -> torch.Tensor:
        """Per placeholder, the index of the newline that ends its row (a newline: its own); -1 for the base
        crop's tokens of a tiled image, whose rows have no newline."""
        newline = layout[:, CONTENT] < 0.5
        rows = torch.cumsum(newline.long(), dim=0) - newline.long()
        tiled = bool((layout[:, CROP] > 0).any())
        return rows.masked_fill(tiled & (layout[:, CROP] == 0) & ~newline, -1)

    def image_token_counts(self, kwargs: dict) -> list[int]:
        counts = encoded_counts(kwargs, "image")
        if counts is not None:
            return counts
        if kwargs.get("pixel_values") is None:
            return []
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise InvalidInput(f"{self.family} needs image_sizes with pixel_values: pass the processor's output unchanged")
        return [int(image.shape[0]) for image in self.layout(sizes, kwargs.get("batch_num_images"))]

    # -- pictures: one per plane (docs/models.md §3) ---------------------------------------------------

    def _layouts(self, inputs: dict) -> list[torch.Tensor]:
        if inputs.get("pixel_values") is None:
            return []
        if inputs.get("image_sizes") is None:
            raise InvalidInput(f"{self.family} needs image_sizes with pixel_values: pass the processor's output unchanged")
        return self.layout(inputs["image_sizes"], inputs.get("batch_num_images"))

    def image_grids(self, inputs: dict) -> list[tuple[int, int]]:
        """Per picture: each image's base crop, then (tiled images) its unpadded tile plane."""
        return [plane for layout in self._layouts(inputs) for plane in self.planes(layout)]

    def picture_cells(self, inputs: dict) -> list[tuple[int, str, torch.Tensor]]:
        cells = []
        for image, layout in enumerate(self._layouts(inputs)):
            content = torch.nonzero(layout[:, CONTENT] > 0.5).flatten()
            for name, plane in zip(PLANE_NAMES, content.split([h * w for h, w in self.planes(layout)])):
                cells.append((image, name, plane))
        return cells

    def pixel_views(self, inputs: dict) -> list[torch.Tensor]:
        """Per picture, the pixels under its tokens laid out on its plane: the base crop as the tower saw it,
        the tile plane stitched, unpadded (and on OneVision downscaled) like the features, from the same
        packed patches as VFlowOpt's entropy."""
        sizes, num_images = inputs["image_sizes"], inputs.get("batch_num_images")
        crops = torch.cat([pixels[:count] for pixels, count in zip(inputs["pixel_values"], self.crops(sizes, num_images))])
        views = []
        for patches, layout in zip(self.pack_patches(self.patches_of(crops), sizes, num_images), self._layouts(inputs)):
            content = patches[layout[:, CONTENT] > 0.5]
            channels, side = content.shape[1], content.shape[-1]
            for (rows, cols), blocks in zip(self.planes(layout), content.split([h * w for h, w in self.planes(layout)])):
                views.append(blocks.reshape(rows, cols, channels, side, side).permute(2, 0, 3, 1, 4)
                             .reshape(channels, rows * side, cols * side))
        return views

    def pack_patches(self, patches: torch.Tensor, image_sizes, batch_num_images=None) -> list[torch.Tensor]:
        """Per-crop pixel blocks [n, T, C, p, p] -> per image [placeholders, C, p, p], packed as values."""
        packed = self.pack(patches.flatten(2), image_sizes, batch_num_images)
        return [image.view(image.shape[0], *patches.shape[2:]) for image in packed]

    # -- hooks --------------------------------------------------------------------------------------

    def install(self, needed: set[str], capture: Capture) -> list:
        """Hooks that record each encoder call's per-crop outputs, packed per image at the projector.

        Packing needs the call's `image_sizes`, which no module sees: generate() calls `get_image_features`
        itself, before any forward, and keeps the sizes from the model's forward. So the base model's
        `get_image_features` is wrapped (an instance attribute, deleted again by `remove()`) to note them
        for the duration of the call (docs/models.md §2)."""
        tower = self.base.vision_tower
        projector = self.base.multi_modal_projector
        encode = self.base.get_image_features

        @functools.wraps(encode)
        def encode_noting_sizes(*args, **kwargs):
            arguments = inspect.signature(encode).bind(*args, **kwargs).arguments
            capture.scratch["sizes"] = arguments["image_sizes"], arguments.get("batch_num_images")
            try:
                return encode(*args, **kwargs)
            finally:
                capture.scratch.pop("sizes", None)

        def record_tokens(module, args, output):
            if capture.scratch.get("video"):
                return  # a video's frames: recorded once pooled, by encode_video_noting_frames
            if "sizes" not in capture.scratch:
                raise InvalidInput(f"{self.family}: the projector ran outside get_image_features, so the image sizes "
                                   f"that place its tokens are unknown; encode images through the model")
            self.record_packed(capture, output, *capture.scratch["sizes"])

        def start(module, args, kwargs):
            capture.start_call()
            if "patches" in needed:
                pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
                capture.record(UNPACKED + "patches", [self.patches_of(pixels)])

        handles = [tower.register_forward_pre_hook(start, with_kwargs=True),
                   projector.register_forward_hook(record_tokens),
                   InstanceAttribute(self.base, "get_image_features", encode_noting_sizes)]
        handles += self.video_hooks(capture)
        if needed & {"saliency", "keys", "crop_attention"}:

            def record_attention(attention, queries, keys):
                for name, per_crop in self.attention_signals(attention, queries, keys, needed).items():
                    capture.record(UNPACKED + name, [per_crop])

            handles += self.query_key_hooks(capture, record_attention)
        if "features" in needed:
            handles.append(projector.register_forward_pre_hook(
                lambda module, args: capture.record(UNPACKED + "features", [args[0]])))
        return handles

    def video_hooks(self, capture: Capture) -> list:
        """Hooks that record each encoded video (none on LLaVA-NeXT, which takes no video)."""
        return []

    def record_packed(self, capture: Capture, crop_tokens: torch.Tensor, sizes, num_images) -> None:
        """The projector's per-crop output and this encoder call's per-crop signals, packed per image: tokens
        (with the model's newline, as the LLM receives them), candidates (not newlines), rows, crops, planes."""
        if sum(self.crops(sizes, num_images)) != crop_tokens.shape[0]:
            raise InvalidInput(f"{self.family}: the vision tower encoded {crop_tokens.shape[0]} crops, which the "
                               f"image_sizes of the call do not account for; pass the processor's output unchanged")
        call = capture.calls[-1]
        for name in [key for key in call if key.startswith(UNPACKED)]:
            (per_crop,) = call.pop(name)  # [n, T, ...]: packed with its trailing dimensions as channels
            packed = self.pack(per_crop.reshape(*per_crop.shape[:2], -1), sizes, num_images)
            call[name[len(UNPACKED):]] = [p.view(p.shape[0], *per_crop.shape[2:]) for p in packed]
        capture.record("tokens", self.pack(crop_tokens, sizes, num_images, self.base.image_newline))
        layout = self.layout(sizes, num_images)
        capture.record("candidates", [image[:, CONTENT] > 0.5 for image in layout])
        capture.record("rows", [self.newline_rows(image) for image in layout])
        capture.record("crops", [image[:, [CROP, ROW]] for image in layout])  # per_crop budgets: crop, row in it
        capture.record("planes", [self.planes(image) for image in layout])

    def attention_signals(self, attn, queries, keys, needed) -> dict[str, torch.Tensor]:
        """Per crop: the CLS->patch attention [n, T] (saliency), the patches' head-mean keys [n, T, d] and
        VFlowOpt's `crop_attention` of the patch-to-patch map, CLS excluded as on LLaVA [n, T, 2, T]."""
        batch, length, _ = keys.shape
        keys = keys.view(batch, length, attn.num_heads, attn.head_dim)
        signals = {}
        if "keys" in needed:
            signals["keys"] = keys[:, 1:].float().mean(dim=2)
        if needed & {"saliency", "crop_attention"}:
            rows = queries if "crop_attention" in needed else queries[:, :1]
            rows = rows.reshape(batch, rows.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
            probs = attention_probs(rows, keys.transpose(1, 2), attn.scale)  # [n, Q, 1 + T]
            if "saliency" in needed:
                signals["saliency"] = probs[:, 0, 1:]
            if "crop_attention" in needed:
                signals["crop_attention"] = crop_attention(probs[:, 1:, 1:])
        return signals


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """SigLIP has no CLS token: the saliency is the attention each token receives at the feature layer,
    averaged over heads and queries (docs/models.md §4), recomputed from the layer's own q/k projections
    so the tower stays on SDPA; VFlowOpt's map is the same one, every token a query and a key. A prompt
    with several images sends each as one base crop."""

    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    provides = LlavaNextAdapter.provides | {"frames"}
    tower_model_type, tower_name = "siglip_vision_model", "a SigLIP vision tower"
    select_strategy, strategy_meaning = "full", "every patch token"

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    @property
    def frame_side(self) -> int:
        """Tokens per side of a video frame: the tower's grid resized bilinearly to half, rounded up (27 -> 14)."""
        return math.ceil(self.grid[0] / 2)

    def video_views(self, inputs: dict) -> list[tuple[list[torch.Tensor], tuple[int, int]]]:
        """Per video, its frames as the tower saw them; the frame's s x s tokens, resized bilinearly from the
        tower's grid, cover each evenly."""
        return [(list(video), (self.frame_side, self.frame_side)) for video in inputs["pixel_values_videos"]]

    def video_token_counts(self, kwargs: dict) -> list[int]:
        """Per video: its frames' tokens and one trailing newline (get_video_features)."""
        counts = encoded_counts(kwargs, "video")
        if counts is not None:
            return counts
        pixels = kwargs.get("pixel_values_videos")
        if pixels is None:
            return []
        return [int(pixels.shape[1]) * self.frame_side**2 + 1] * int(pixels.shape[0])

    def video_hooks(self, capture: Capture) -> list:
        """`get_video_features` wrapped (an instance attribute, like get_image_features) so that the
        projector's per-frame output is not taken for an image's crops, and each video is recorded from what
        it returns (docs/models.md §7)."""
        encode = self.base.get_video_features

        @functools.wraps(encode)
        def encode_noting_frames(*args, **kwargs):
            capture.scratch["video"] = True
            try:
                output = encode(*args, **kwargs)
            finally:
                capture.scratch.pop("video", None)
            self.record_video(capture, output.pooler_output)
            return output

        return [InstanceAttribute(self.base, "get_video_features", encode_noting_frames)]

    def record_video(self, capture: Capture, videos: torch.Tensor) -> None:
        """The videos of one encoder call ([B, F·s² + 1, D], s = `frame_side`) and their per-frame signals,
        resized from the tower's grid to the frame's s x s tokens by the model's own bilinear resize
        (`apply_pooling`), a zero row for the trailing newline, which is no candidate: tokens, candidates,
        rows, frames (F, s, s) and planes. VFlowOpt's per-frame map is resized on both axes (queries and
        keys) before its view is built, so a token's context is its own frame."""
        batch, length = videos.shape[:2]
        side = self.frame_side
        frames = (length - 1) // side**2
        call = capture.calls[-1]
        for name in [key for key in call if key.startswith(UNPACKED)]:
            (per_frame,) = call.pop(name)  # [B·F, T, ...]
            if name == UNPACKED + "crop_attention":  # [n, T, 2, T]: rebuilt from the resized map
                attention = per_frame[:, :, 0].transpose(1, 2)  # rows: queries
                attention = self.base.apply_pooling(self.base.apply_pooling(attention).transpose(1, 2)).transpose(1, 2)
                per_frame = crop_attention(attention)
            else:
                values = per_frame.reshape(*per_frame.shape[:2], -1)  # trailing dimensions as channels
                per_frame = self.base.apply_pooling(values).view(per_frame.shape[0], side**2, *per_frame.shape[2:])
            per_video = per_frame.reshape(batch, frames * side**2, *per_frame.shape[2:])
            newline = per_video.new_zeros(batch, 1, *per_video.shape[2:])
            call[name[len(UNPACKED):]] = list(torch.cat([per_video, newline], dim=1))
        capture.record("tokens", list(videos))
        candidates = torch.arange(length, device=videos.device) < frames * side**2
        capture.record("candidates", [candidates] * batch)
        capture.record("rows", [torch.zeros(length, dtype=torch.long, device=videos.device)] * batch)
        capture.record("frames", [(frames, side, side)] * batch)
        capture.record("planes", [((side, side),) * frames] * batch)

    def crops(self, image_sizes, batch_num_images=None) -> list[int]:
        # several images in one prompt: one base crop each (get_image_features' need_patching)
        patching = [True] * len(image_sizes) if batch_num_images is None else [
            int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        tile = self.config.vision_config.image_size
        return [image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=tile) if patch else 1
                for size, patch in zip(image_sizes, patching)]

    def _pack_call(self, values, image_sizes, newline):
        packed, _ = self.base.pack_image_features(values, image_sizes, image_newline=newline,
                                                  vision_aspect_ratio=self.config.vision_aspect_ratio)
        return packed

    def attention_signals(self, attn, queries, keys, needed) -> dict[str, torch.Tensor]:
        batch, length, _ = keys.shape
        keys = keys.view(batch, length, attn.num_heads, attn.head_dim)
        signals = {}
        if "keys" in needed:
            signals["keys"] = keys.float().mean(dim=2)
        if needed & {"saliency", "crop_attention"}:
            queries = queries.reshape(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
            if "crop_attention" in needed:  # VFlowOpt needs the whole map: its column means are the saliency
                probs = attention_probs(queries, keys.transpose(1, 2), attn.scale)  # [n, T, T]
                signals["crop_attention"] = crop_attention(probs)
                if "saliency" in needed:
                    signals["saliency"] = probs.mean(dim=1)
            else:  # column means of the head-averaged map, never formed (signals/attention.py)
                signals["saliency"] = received_attention(queries, keys.transpose(1, 2), attn.scale).div_(length)
        return signals
