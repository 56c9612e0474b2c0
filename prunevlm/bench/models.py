"""Random-weight models of real shapes for speed measurements (speed does not depend on the weights): LLaVA
and the bench's other families (LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL), their prompts of one
image or one video (Qwen2.5-VL and LLaVA-OneVision), and signals of their shapes."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

from ..defaults import BENCH_FAMILIES
from ..errors import InvalidSetting

IMAGE_TOKEN = 32000

# CLIP ViT-L/14-336, as in LLaVA-1.5: 24 x 24 = 576 patch tokens plus CLS.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
TEXT = {
    # for tests of the benchmark code only: the 576-token geometry with tiny widths
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    # scaled for a 2-core CPU (docs/transformers.md §6)
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16),
    # Vicuna-7B, the LLM of LLaVA-1.5-7B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
SHAPES = tuple(TEXT)


def llava_config(shape: str) -> LlavaConfig:
    if shape not in TEXT:
        raise InvalidSetting(f"shape must be one of {list(TEXT)}, got {shape!r}")
    vision = CLIP_L_336
    if shape == "tiny":
        vision = dict(CLIP_L_336, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **TEXT[shape]),
        image_token_index=IMAGE_TOKEN, image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def build_model(shape: str, dtype: torch.dtype, device: torch.device, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    config = llava_config(shape)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):  # built in `dtype` directly: the 7B shape in fp32 first would need 27 GB
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: decode a fixed number of tokens
    model.generation_config.pad_token_id = 0
    return model


def prompt_inputs(model, text_tokens: int, device: torch.device, batch: int = 1) -> dict:
    """`batch` prompts, each one image between two halves of `text_tokens` random text tokens, LLaVA-1.5
    style (the same text in every row, so that every image has the same text length; images differ)."""
    g = torch.Generator().manual_seed(0)
    half = text_tokens // 2
    text = torch.randint(3, 31999, (text_tokens,), generator=g)
    side = model.config.vision_config.image_size
    ids = torch.cat([torch.tensor([1]), text[:half], torch.full((576,), IMAGE_TOKEN), text[half:]])[None].expand(batch, -1)
    pixels = torch.randn(batch, 3, side, side, generator=g).to(model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "pixel_values": pixels.to(device)}


# Qwen2.5-VL-7B (vision tower, LLM, M-RoPE sections of half a head), and a tiny one of the same geometry.
QWEN_TOKENS = dict(image=151655, video=151656, start=151652, end=151653)
QWEN_SHAPES = {
    "7b": (dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                fullatt_block_indexes=[7, 15, 23, 31]),
           dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4), [16, 24, 24]),
    "tiny": (dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                  fullatt_block_indexes=[1, 3]),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2), [2, 3, 3]),
}


def qwen2_5_vl_config(shape: str) -> Qwen2_5_VLConfig:
    vision, text, sections = QWEN_SHAPES[shape]
    return Qwen2_5_VLConfig(
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           in_channels=3),
        text_config=dict(text, vocab_size=152064, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections}),
        image_token_id=QWEN_TOKENS["image"], video_token_id=QWEN_TOKENS["video"],
        vision_start_token_id=QWEN_TOKENS["start"], vision_end_token_id=QWEN_TOKENS["end"],
    )


def build_qwen(shape: str, dtype: torch.dtype, device: torch.device, attn: str = "sdpa") -> Qwen2_5_VLForConditionalGeneration:
    config = qwen2_5_vl_config(shape)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def qwen_prompt_inputs(model, text_tokens: int, device: torch.device, batch: int = 1, side: int = 48) -> dict:
    """`batch` prompts of one image of side x side patches (48: 576 merged tokens, a 672-pixel image)."""
    g = torch.Generator().manual_seed(0)
    half = text_tokens // 2
    text = torch.randint(3, 150000, (text_tokens,), generator=g)
    image = torch.tensor([QWEN_TOKENS["start"]] + [QWEN_TOKENS["image"]] * (side * side // 4) + [QWEN_TOKENS["end"]])
    ids = torch.cat([text[:half], image, text[half:]])[None].expand(batch, -1)
    vision = model.config.vision_config
    pixels = torch.randn(batch * side * side, 3 * vision.temporal_patch_size * vision.patch_size**2, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": (ids == QWEN_TOKENS["image"]).int().to(device),
            "pixel_values": pixels.to(model.dtype).to(device),
            "image_grid_thw": torch.tensor([[1, side, side]] * batch).to(device)}


def selection_signals(shape: str, images: int, text_tokens: int, seed: int = 0) -> dict:
    """Random signals with the shapes the LLaVA adapter records on a `shape` bench model, for `images` images:
    576 tokens of the LLM's width, CLIP features, saliency, the patch-to-patch attention, the 14-pixel patches,
    the 24 x 24 grid and `text_tokens` prompt rows."""
    config = llava_config(shape)
    g = torch.Generator().manual_seed(seed)
    tokens, width = 576, config.text_config.hidden_size
    patch = config.vision_config.patch_size
    return {
        "image_tokens": torch.randn(images, tokens, width, generator=g),
        "features": torch.randn(images, tokens, config.vision_config.hidden_size, generator=g),
        "saliency": torch.rand(images, tokens, generator=g).pow(8).softmax(dim=-1),
        "text_embeds": torch.randn(images, text_tokens, width, generator=g),
        "attention": torch.rand(images, tokens, tokens, generator=g).softmax(dim=-1),
        "patches": torch.randn(images, tokens, 3, patch, patch, generator=g),
        "grid": (24, 24),
    }


# The bench's families (`prunevlm bench --model-family`, defaults.BENCH_FAMILIES). Each shape keeps the tower's real width, heads and
# tokens per crop, so the signals cost what they cost in the released models; "small" cuts the tower to
# SMALL_TOWER_LAYERS layers (every crop goes through it: 5 crops of a 24-layer tower take about a minute per
# generate on 2 cores) and the LLM to the LLaVA bench's h1024 x 8 layers; "7b" is the released model's shape
# (for a GPU); "tiny" has tiny widths, for tests of the benchmark code.
SMALL_TOWER_LAYERS = 4
# Qwen2.5-VL scaled like the other families: its tower's width and heads with SMALL_TOWER_LAYERS layers (the
# last one full attention), the LLaVA bench's h1024 x 8 LLM with Qwen2.5-7B's 4 KV heads
QWEN_SHAPES["small"] = (
    dict(depth=SMALL_TOWER_LAYERS, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1024,
         fullatt_block_indexes=[SMALL_TOWER_LAYERS - 1]),
    dict(TEXT["small"], num_key_value_heads=4), [8, 12, 12])
# one image of a fixed aspect ratio per prompt, (h, w) pixels: NeXT 672 x 672 and OneVision 768 x 768 are
# 2 x 2 tiles plus the base (5 crops); Qwen3-VL 768 x 768 is 48 x 48 patches of 16, 576 merged tokens
FAMILY_IMAGE = {"next": (672, 672), "onevision": (768, 768), "qwen3vl": (768, 768)}
# a video's frames, (h, w) pixels: Qwen2.5-VL 448 x 448 is 32 x 32 patches of 14, 256 merged tokens per
# temporal patch of 2 frames (128 per frame); OneVision resizes every frame to its tower's 384 square,
# 196 tokens after its 2 x 2 pooling, and adds one newline after the last frame
VIDEO_FRAME = {"qwen2_5vl": (448, 448), "onevision": (384, 384)}
TINY_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
# SigLIP-so400m/384 (LLaVA-OneVision-7B's tower; transformers' default LLaVA-OneVision vision config)
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                         image_size=384, patch_size=14)
QWEN2 = {  # Qwen2-7B, the LLM of LLaVA-OneVision-7B, and its scaled shapes
    "tiny": dict(TEXT["tiny"], num_key_value_heads=2),
    "small": dict(TEXT["small"], num_key_value_heads=4),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
}
QWEN3_VL = {  # Qwen3-VL-8B (vision tower, LLM, interleaved M-RoPE sections of half a head) and scaled shapes
    "tiny": (dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                  deepstack_visual_indexes=[0, 1, 2]),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16), [2, 3, 3]),
    "small": (dict(depth=SMALL_TOWER_LAYERS, hidden_size=1152, intermediate_size=4304, num_heads=16,
                   out_hidden_size=1024, deepstack_visual_indexes=[1, 2, 3]),
              dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=64), [12, 10, 10]),
    "7b": (dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                deepstack_visual_indexes=[8, 16, 24]),
           dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128), [24, 20, 20]),
}
ONEVISION_IMAGE = 151646


def _tower(base: dict, shape: str) -> dict:
    if shape == "tiny":
        return dict(base, **TINY_TOWER)
    return dict(base, num_hidden_layers=SMALL_TOWER_LAYERS) if shape == "small" else base


def family_config(family: str, shape: str):
    """The config of a `family` bench model of `shape` (tiny, small or 7b)."""
    if family not in BENCH_FAMILIES:
        raise InvalidSetting(f"model family must be one of {', '.join(BENCH_FAMILIES)}, got {family!r}")
    if shape not in TEXT:
        raise InvalidSetting(f"shape must be one of {list(TEXT)}, got {shape!r}")
    if family == "llava":
        return llava_config(shape)
    if family == "qwen2_5vl":
        return qwen2_5_vl_config(shape)
    if family == "next":  # LLaVA-NeXT-7B: CLIP ViT-L/14-336, Vicuna-7B, the default pinpoints (2 to 4 tiles)
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**_tower(CLIP_L_336, shape)),
            text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **TEXT[shape]),
            image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
            projector_hidden_act="gelu")
    if family == "onevision":  # LLaVA-OneVision-7B: SigLIP-so400m/384, Qwen2-7B, anyres_max_9 pinpoints
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**_tower(SIGLIP_SO400M_384, shape)),
            text_config=Qwen2Config(vocab_size=152064, max_position_embeddings=32768, **QWEN2[shape]),
            image_token_index=ONEVISION_IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="full")
    vision, text, sections = QWEN3_VL[shape]
    return Qwen3VLConfig(
        vision_config=dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=2304),
        text_config=dict(text, vocab_size=151936, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": sections,
                                          "mrope_interleaved": True}),
        image_token_id=QWEN_TOKENS["image"], video_token_id=QWEN_TOKENS["video"],
        vision_start_token_id=QWEN_TOKENS["start"], vision_end_token_id=QWEN_TOKENS["end"])


FAMILY_CLASSES = {"llava": LlavaForConditionalGeneration, "next": LlavaNextForConditionalGeneration,
                  "onevision": LlavaOnevisionForConditionalGeneration, "qwen2_5vl": Qwen2_5_VLForConditionalGeneration,
                  "qwen3vl": Qwen3VLForConditionalGeneration}


def build_family(family: str, shape: str, dtype: torch.dtype, device: torch.device, attn: str = "sdpa"):
    """A random-weight `family` model of `shape`, built in `dtype` on `device`, decoding a fixed number of tokens."""
    config = family_config(family, shape)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = FAMILY_CLASSES[family]._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def family_inputs(family: str, model, text_tokens: int, device: torch.device) -> dict:
    """One prompt of one image (`FAMILY_IMAGE`; LLaVA: its 336 px square) between two halves of
    `text_tokens` random text tokens, with as many placeholders as the model packs for it."""
    if family == "llava":
        return prompt_inputs(model, text_tokens, device)
    if family == "qwen2_5vl":
        return qwen_prompt_inputs(model, text_tokens, device)
    if family == "qwen3vl":
        side = FAMILY_IMAGE[family][0] // model.config.vision_config.patch_size
        return qwen_prompt_inputs(model, text_tokens, device, side=side)
    from ..models import get_adapter

    g = torch.Generator().manual_seed(0)
    half = text_tokens // 2
    text = torch.randint(3, 31999, (text_tokens,), generator=g)
    sizes = torch.tensor([FAMILY_IMAGE[family]])
    adapter = get_adapter(model)
    (count,) = adapter.image_token_counts({"pixel_values": torch.zeros(1), "image_sizes": sizes})
    (crops,) = adapter.crops(sizes)
    tile = model.config.vision_config.image_size
    ids = torch.cat([torch.tensor([1]), text[:half], torch.full((count,), model.config.image_token_id), text[half:]])[None]
    pixels = torch.randn(1, crops, 3, tile, tile, generator=g).to(model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device), "image_sizes": sizes.to(device)}


VIDEO_FAMILIES = tuple(VIDEO_FRAME)  # prunevlm bench --video-frames


def video_inputs(family: str, model, text_tokens: int, frames: int, device: torch.device) -> dict:
    """One prompt of one video of `frames` frames (`VIDEO_FRAME`) between two halves of `text_tokens` random
    text tokens, with as many placeholders as the model gives it: Qwen2.5-VL (an even number of frames: two
    per temporal patch) frames / 2 x (h/28) x (w/28) between its vision start and end tokens; OneVision
    frames x 196 + 1."""
    if family not in VIDEO_FAMILIES:
        raise InvalidSetting(f"the video bench runs on {', '.join(VIDEO_FAMILIES)}, not {family!r}")
    g = torch.Generator().manual_seed(0)
    half = text_tokens // 2
    text = torch.randint(3, 150000, (text_tokens,), generator=g)
    height, width = VIDEO_FRAME[family]
    config = model.config
    if family == "qwen2_5vl":
        vision = config.vision_config
        steps, rows, columns = frames // vision.temporal_patch_size, height // vision.patch_size, width // vision.patch_size
        if steps * vision.temporal_patch_size != frames:
            raise InvalidSetting(f"Qwen2.5-VL merges {vision.temporal_patch_size} frames per temporal patch: give an "
                                 f"even number of frames, got {frames}")
        count = steps * rows * columns // vision.spatial_merge_size**2
        video = torch.tensor([QWEN_TOKENS["start"]] + [QWEN_TOKENS["video"]] * count + [QWEN_TOKENS["end"]])
        ids = torch.cat([text[:half], video, text[half:]])[None]
        pixels = torch.randn(steps * rows * columns, 3 * vision.temporal_patch_size * vision.patch_size**2, generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "mm_token_type_ids": (2 * (ids == QWEN_TOKENS["video"])).int().to(device),
                "pixel_values_videos": pixels.to(model.dtype).to(device),
                "video_grid_thw": torch.tensor([[steps, rows, columns]]).to(device)}
    side = config.vision_config.image_size // config.vision_config.patch_size  # 27 patches, pooled to 14
    count = frames * ((side + 1) // 2) ** 2 + 1
    ids = torch.cat([torch.tensor([1]), text[:half], torch.full((count,), config.video_token_id), text[half:]])[None]
    pixels = torch.randn(1, frames, 3, height, width, generator=g).to(model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values_videos": pixels.to(device)}
