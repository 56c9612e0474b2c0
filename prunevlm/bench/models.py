"""Random-weight LLaVA models of real shapes for speed measurements (speed does not depend on the weights)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
        raise ValueError(f"shape must be one of {list(TEXT)}, got {shape!r}")
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


def prompt_inputs(model, text_tokens: int, device: torch.device) -> dict:
    """One image between two halves of `text_tokens` random text tokens, LLaVA-1.5 style."""
    g = torch.Generator().manual_seed(0)
    half = text_tokens // 2
    text = torch.randint(3, 31999, (text_tokens,), generator=g)
    side = model.config.vision_config.image_size
    ids = torch.cat([torch.tensor([1]), text[:half], torch.full((576,), IMAGE_TOKEN), text[half:]])[None]
    pixels = torch.randn(1, 3, side, side, generator=g).to(model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "pixel_values": pixels.to(device)}
