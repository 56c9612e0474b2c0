"""A video frame's saliency, as a pre-LLM method receives it, is that frame's own (#27 item 3; docs/models.md
§4, §6, §7): checked frame by frame, in both video scopes, against a reference each test computes from
transformers' eager attention weights of the same tower (the handle's model stays on SDPA)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig
from transformers.vision_utils import get_vision_window_index

import prunevlm
import tiny
from prunevlm.methods.base import Method, Selection

SCOPES = ["per_frame", "per_clip"]
# fp32 on both sides: the handle's saliency is recomputed from the block's own q/k, the reference is eager's
# softmax; they differ by summation order only (observed <= 4e-6 relative), while a token or frame out of
# place, or another resize than the model's, moves values by percents on the sharpened towers below
TOLERANCE = dict(rtol=1e-5, atol=1e-8)


def assert_spread(reference: torch.Tensor) -> None:
    """The saliencies differ by over 10 % (10^4 times the tolerance), so a value out of place shows."""
    assert reference.amax() - reference.amin() > 0.1 * reference.amax()


@dataclass
class SaliencyProbe(Method):
    """Keeps the first k tokens and notes the saliency of every call (one per frame under per_frame)."""

    name: ClassVar[str] = "saliency_probe"
    description: ClassVar[str] = "test: notes the saliency it is given"
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "saliency")

    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    def select(self, k, image_tokens, **signals) -> Selection:
        self.seen.append(signals["saliency"][0])
        return Selection(keep=torch.arange(k).expand(image_tokens.shape[0], -1).clone())


@dataclass
class SaliencyWithMapProbe(SaliencyProbe):
    """Asks for VFlowOpt's per-crop map too: OneVision then takes the saliency as that map's column means."""

    name: ClassVar[str] = "saliency_with_map_probe"
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "saliency", "crop_attention")


def sharpen(tower: torch.nn.Module, factor: float) -> None:
    """Scale every attention's query and key projections: a random tower attends almost uniformly, and a
    saliency near constant would hide a misplaced token."""
    with torch.no_grad():
        for name, weight in tower.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(factor)
            elif name.endswith("attn.qkv.weight"):  # Qwen: rows of q, then k, then v
                weight[: 2 * weight.shape[1]].mul_(factor)


def eager_twin(model, build):
    twin = build(attn="eager")
    twin.load_state_dict(model.state_dict())
    return twin


def seen_saliency(model, probe: SaliencyProbe, inputs: dict, scope: str) -> list[torch.Tensor]:
    with torch.no_grad(), prunevlm.prune(model, probe, 0.5, video_scope=scope):
        model(**inputs)
    return probe.seen


def bilinear(size_in: int, size_out: int) -> torch.Tensor:
    """[out, in] weights of a 1D bilinear resize with half-pixel centres (torch's align_corners=False: source
    (i + 0.5) · in / out − 0.5, clamped at 0), the resize OneVision's `apply_pooling` applies per axis."""
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        source = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = int(source)
        high = min(low + 1, size_in - 1)
        weights[i, low] += 1 - (source - low)
        weights[i, high] += source - low
    return weights


def onevision(attn: str = "sdpa") -> LlavaOnevisionForConditionalGeneration:
    """The tiny OneVision with the released grid: 27 x 27 patches per frame (patch 2, 54 px), so a frame's
    tokens are resized bilinearly to 14 x 14 (not a 2 x 2 average, which the tiny 4 x 4 grid would be)."""
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**{**tiny.TOWER, "image_size": 54, "patch_size": 2}),
                                  text_config=tiny._llama(1), image_token_index=tiny.LLAVA_IMAGE,
                                  video_token_index=tiny.LLAVA_IMAGE - 1, image_grid_pinpoints=tiny.PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    return tiny._build(LlavaOnevisionForConditionalGeneration, config, attn)


@pytest.mark.parametrize("probe", [SaliencyProbe, SaliencyWithMapProbe])
@pytest.mark.parametrize("scope", SCOPES)
def test_onevision_video_saliency_is_each_frames_attention_resized_like_its_tokens(probe, scope):
    """Definition (docs/models.md §4, §7): a frame's saliency is the attention each of its 27 x 27 patches
    receives at the feature layer, averaged over heads and queries (the frame alone: SigLIP encodes frames as
    separate images), resized to 14 x 14 by the same bilinear resize as the frame's features. Reference: the
    eager tower's attention weights of each frame, resized with explicit bilinear weights. Two videos of 3
    frames in one row; per_frame gives one frame per call, per_clip the clip's frames in time order."""
    model = onevision()
    sharpen(model.model.vision_tower, 2.0)
    twin = eager_twin(model, onevision)
    frames, grid, side = 3, 27, 14
    count = frames * side**2 + 1  # the video's placeholders: its frames' tokens, one trailing newline
    video = model.config.video_token_id
    ids = torch.tensor([[tiny.BOS, 5, 6, *[video] * count, 7, 8, *[video] * count, 9]])
    pixels = torch.randn(2, frames, 3, 54, 54, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}

    with torch.no_grad():
        attention = twin.model.vision_tower(pixels.flatten(0, 1), output_attentions=True).attentions
    # hidden_states[l] for l < 0 is the output of the layer whose weights are attentions[l]
    received = attention[model.config.vision_feature_layer].double().mean(dim=(1, 2))  # [videos·frames, 729]
    resize = bilinear(grid, side)
    reference = (resize @ received.view(-1, grid, grid) @ resize.T).flatten(1).float()  # [videos·frames, 196]
    assert_spread(reference)

    seen = seen_saliency(model, probe(), inputs, scope)
    per_frame = [s for clip in seen for s in clip.split(side**2)] if scope == "per_clip" else seen
    assert len(seen) == (2 if scope == "per_clip" else 2 * frames) and len(per_frame) == 2 * frames
    for got, expected in zip(per_frame, reference):
        torch.testing.assert_close(got, expected, **TOLERANCE)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_video_saliency_is_each_temporal_patchs_attention(name, scope, monkeypatch):
    """Definition (docs/flashvlm.md §4, docs/models.md §6, §7): per temporal patch, the attention each patch
    receives in the last full-attention vision block (summed over the patch's queries, averaged over heads),
    averaged over the 2 x 2 patches a merged token holds, in the frame's raster order. Reference: the eager
    block's own attention weights per chunk of its `cu_seqlens` (the tower splits a video by temporal patch),
    recorded by wrapping transformers' eager attention; Qwen2.5-VL's blocks see the patches in window order,
    undone with the tower's own window index. Frames of 2 x 4 and 2 x 3 merged tokens span two windows."""
    build = getattr(tiny, name)
    model = build()
    sharpen(model.model.visual, 8.0)
    twin = eager_twin(model, build)
    inputs = tiny.qwen_video_inputs(model, [[(3, 4, 8), (2, 4, 6)]])
    vision = model.config.vision_config
    full = getattr(vision, "fullatt_block_indexes", None)  # Qwen2.5-VL; the others attend fully in every block
    block = twin.model.visual.blocks[max(full) if full else vision.depth - 1].attn

    module = importlib.import_module(type(block).__module__)
    eager, weights = module.eager_attention_forward, []

    def recording(attention, *args, **kwargs):
        output, probs = eager(attention, *args, **kwargs)
        if attention is block:
            weights.append(probs[0])  # [heads, S, S], one chunk of cu_seqlens
        return output, probs

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        twin.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    monkeypatch.undo()
    assert [w.shape[-1] for w in weights] == [32] * 3 + [24] * 2  # one chunk per temporal patch
    received = torch.cat([w.double().mean(dim=0).sum(dim=0) for w in weights])  # per patch, in the block's order
    merged = received.view(-1, vision.spatial_merge_size**2).mean(dim=1)  # a merged token's patches are adjacent
    if full:
        window_index, _ = get_vision_window_index(inputs["video_grid_thw"], vision.spatial_merge_size,
                                                  vision.window_size, vision.patch_size)
        merged = merged[torch.argsort(window_index)]
    reference = merged.float().split([8] * 3 + [6] * 2)
    assert_spread(merged)

    seen = seen_saliency(model, SaliencyProbe(), inputs, scope)
    per_frame = [s for clip, size in zip(seen, (8, 6)) for s in clip.split(size)] if scope == "per_clip" else seen
    assert len(seen) == (2 if scope == "per_clip" else 5) and len(per_frame) == 5
    for got, expected in zip(per_frame, reference):
        torch.testing.assert_close(got, expected, **TOLERANCE)
