"""VFlowOpt on LLaVA-NeXT and LLaVA-OneVision (packed AnyRes images: base crop, unpadded tile plane, row
newlines), its calibration, and the kept-token pictures of both planes, on tiny random models."""

import math
from collections import Counter

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

import prunevlm
import tiny
from prunevlm.budget import Budget
from prunevlm.calibrate.search import FlowObjective, run_search
from prunevlm.loading import pixel_normalisation
from prunevlm.methods.vflowopt import VFlowOpt, context_relevance, crop_context_relevance
from prunevlm.models import get_adapter
from prunevlm.models.base import Capture
from prunevlm.models.llava_next import CONTENT
from prunevlm.runtime.contract import output_cache
from prunevlm.signals.entropy import CLIP_MEAN, CLIP_STD, grey_levels, patch_entropy
from prunevlm.viz import PRUNED_SHADE, draw_tokens, model_view

FAMILIES = {"llava_next": tiny.llava_next, "llava_onevision": tiny.llava_onevision}
# row 0: a wide image (1 x 2 tiles); row 1: two images, a large one (OneVision downscales its plane) and a
# square one; row 2: text only
SIZES = [[(30, 50)], [(100, 120), (40, 40)], []]
LAYERS = 4
STAGES = (1, 2)
GENERATE = dict(max_new_tokens=4, **tiny.GREEDY)


def row_alone(inputs: dict, row: int) -> dict:
    """The inputs of one row of SIZES, unpadded, with its own images."""
    return tiny.row_inputs(inputs, row, sum(len(sizes) for sizes in SIZES[:row]), len(SIZES[row]), "anyres")


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    model = FAMILIES[request.param](layers=LAYERS)
    return request.param, model, tiny.anyres_inputs(model, SIZES)


def capture_of(model, inputs, needed: set[str]) -> dict:
    """The signals the adapter's hooks record for one encoder call of `inputs`."""
    capture = Capture()
    handles = get_adapter(model).install(needed, capture)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return capture.calls[-1]


@torch.no_grad()
@pytest.mark.parametrize("budget", [1.0, 10_000])
def test_a_full_budget_is_the_unhooked_model_and_remove_restores(case, budget):
    """A full budget gives the logits and tokens of the unhooked model, and remove() restores them. Exact: the same
    computation on the same inputs, in one process (the hooks must change nothing the model computes there), not
    two computation paths."""
    _, model, inputs = case
    logits = model(**inputs).logits
    ids = model.generate(**inputs, **GENERATE)
    with prunevlm.prune(model, "vflowopt", budget, layers=STAGES) as handle:
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, **GENERATE), ids)
    assert handle.stats.tokens_after == handle.stats.tokens_before
    with prunevlm.prune(model, "vflowopt", 0.25, layers=STAGES):
        assert not torch.equal(model(**inputs).logits[:, -1], logits[:, -1])
    assert torch.equal(model(**inputs).logits, logits)


@torch.no_grad()
@pytest.mark.parametrize("budget", [8, 0.25])
def test_prefill_is_text_plus_each_image_s_first_stage_and_the_layer_average_meets_the_budget(case, budget):
    """T is the layer-averaged count (docs/vflowopt.md §3.3): the prefill holds counts[0] of each image's
    candidates, never a newline (newline='drop'), and the plan's layer average is T of its placeholders."""
    _, model, inputs = case
    layouts = get_adapter(model).layout(inputs["image_sizes"])
    placeholders = [[int(layouts[0].shape[0])], [int(layouts[1].shape[0]), int(layouts[2].shape[0])], []]
    method = VFlowOpt(layers=STAGES)
    with prunevlm.prune(model, method, budget) as handle:
        model(**inputs)
    stats = handle.stats
    plans = [[method.plan(Budget(budget), n, LAYERS) for n in row] for row in placeholders]
    assert stats.stages == plans and stats.tokens_before == placeholders
    assert stats.tokens_after == [[plan.counts[0] for plan in row] for row in plans]
    text = (inputs["attention_mask"].sum(dim=1) - torch.tensor([sum(row) for row in placeholders])).tolist()
    assert stats.prefill_after == [t + sum(row) for t, row in zip(text, stats.tokens_after)]
    for row, sizes in zip(plans, placeholders):
        for plan, n in zip(row, sizes):
            assert abs(plan.layer_average - Budget(budget).fraction_of(n) * n) <= 1
    for kept, layout in zip([k for row in stats.kept for k in row], layouts):
        assert (layout[kept, CONTENT] > 0.5).all()  # downscaled planes mix the content flag to about 1


@torch.no_grad()
def test_kv_cache_of_a_two_image_prompt_holds_the_plan_s_layer_average(case):
    _, model, inputs = case
    single = row_alone(inputs, 1)
    with prunevlm.prune(model, "vflowopt", 0.3, layers=STAGES) as handle:
        cache = output_cache(model(**single, use_cache=True))
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    plans = handle.stats.stages[0]
    assert len(plans) == 2
    text = handle.stats.prefill_after[0] - sum(handle.stats.tokens_after[0])
    bounds = (0, *STAGES, LAYERS)
    expected = [text + sum(plan.counts[stage] for plan in plans)
                for stage, (start, end) in enumerate(zip(bounds, bounds[1:])) for _ in range(start, end)]
    assert lengths == expected and lengths[0] > lengths[-1]
    assert sum(n - text for n in lengths) / LAYERS == pytest.approx(sum(plan.layer_average for plan in plans))


@torch.no_grad()
def test_onevision_multi_image_prompt_prunes_each_base_crop():
    """A OneVision prompt of several images sends each as its base crop and a newline (docs/models.md §4)."""
    model = tiny.llava_onevision(layers=LAYERS)
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[tiny.BOS, *tiny.text_ids(4, g), *[tiny.LLAVA_IMAGE] * 17, *tiny.text_ids(3, g),
                         *[tiny.LLAVA_IMAGE] * 17, *tiny.text_ids(4, g)]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_sizes": torch.tensor([[30, 50], [100, 120]]),
              "pixel_values": torch.randn(2, 17, 3, 32, 32, generator=g), "batch_num_images": torch.tensor([2])}
    with prunevlm.prune(model, "vflowopt", 0.5, layers=STAGES) as handle:
        model.generate(**inputs, **GENERATE)
    plan = VFlowOpt(layers=STAGES).plan(Budget(0.5), 17, LAYERS)
    assert handle.stats.tokens_before == [[17, 17]] and handle.stats.tokens_after == [[plan.counts[0]] * 2]
    assert all(k.max() < 16 for k in handle.stats.kept[0])  # the newline is no candidate


@torch.no_grad()
def test_left_padded_batch_with_a_text_only_row_equals_the_rows_alone(case):
    _, model, inputs = case
    with prunevlm.prune(model, "vflowopt", 0.3, layers=STAGES):
        tiny.assert_batch_equals_rows(model, inputs, [row_alone(inputs, row) for row in range(len(SIZES))], **GENERATE)


@torch.no_grad()
def test_sampling_and_beam_search_run_pruned(case):
    _, model, inputs = case
    with prunevlm.prune(model, "vflowopt", 0.3, layers=STAGES) as handle:
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=20)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, **tiny.GREEDY)
    assert sampled.shape[0] == 3 and beams.shape[0] == 6
    counts = [[plan.counts[0] for plan in row] for row in handle.stats.stages]
    assert handle.stats.tokens_after == counts and counts[0] == counts[1] and counts[4] == counts[5] == []


def test_recycling_never_mixes_planes():
    """One cell per plane (m far above the planes): every recycled token is a mean of its own plane's tokens,
    +1 on the base crop and -1 on the tile plane in channel 0, never a blend of the two."""
    planes = ((4, 4), (4, 6))
    g = torch.Generator().manual_seed(0)
    n = 16 + 24
    sign = torch.cat([torch.ones(16), -torch.ones(24)])
    tokens = torch.cat([sign[:, None], torch.randn(n, 3, generator=g)], dim=1).expand(2, -1, -1)
    attention = torch.rand(2, n, 2, 16, generator=g)
    signals = dict(image_tokens=tokens, patches=torch.randn(2, n, 3, 2, 2, generator=g), planes=planes,
                   crop_attention=attention)
    for count in (2, 5, 12):
        selection = VFlowOpt(m=1000.0)(Budget(count), **signals)
        for keep, values, recycled in zip(selection.keep, selection.tokens, selection.recycled):
            slots = keep[recycled]
            assert 1 <= slots.numel() <= 2 and (slots < 16).sum() <= 1  # at most one recycled token per plane
            assert torch.equal(values[recycled][:, 0], sign[slots])


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_entropy_is_the_histogram_entropy_of_each_token_s_crop_pixels(family):
    """30 x 50 px: placeholder 0 is the base crop's patch (0, 0); placeholder 16, plane (0, 0), is tile 1's
    patch (0, 1) (its column 0 is letterbox padding, removed by unpadding; docs/models.md §1)."""
    model = FAMILIES[family]()
    inputs = tiny.anyres_inputs(model, [[(30, 50)]])
    (patches,) = capture_of(model, inputs, {"patches"})["patches"]
    pixels = inputs["pixel_values"][0]
    for placeholder, block in ((0, pixels[0, :, 0:8, 0:8]), (16, pixels[1, :, 0:8, 8:16])):
        assert torch.equal(patches[placeholder], block)
        rgb = [(block[c] * s + m) * 255 for c, (m, s) in enumerate(zip(CLIP_MEAN, CLIP_STD))]
        grey = (sum(channel.round().clamp(0, 255) for channel in rgb) / 3).round().flatten().tolist()
        by_hand = -sum(k / 64 * math.log2(k / 64) for k in Counter(grey).values())
        assert patch_entropy(grey_levels(patches[placeholder])).item() == pytest.approx(by_hand, abs=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("t", [0.0, 1.5, 1e6])
def test_context_relevance_is_each_crop_s_own_packed_like_the_features(family, t):
    """The hooks' crop_attention (the feature layer's own q/k, tower on SDPA) gives, per token, the context
    relevance of its crop's eager attention map (CLIP: CLS excluded), packed like the features; t = 1e6 leaves
    every crop's global set empty (the top-1 fallback)."""
    model = FAMILIES[family]()
    inputs = tiny.anyres_inputs(model, [[(30, 50)]])
    adapter = get_adapter(model)
    (recorded,) = capture_of(model, inputs, {"crop_attention"})["crop_attention"]
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        crops = inputs["pixel_values"][0, : adapter.crops(inputs["image_sizes"])[0]]
        attention = tower(crops, output_attentions=True).attentions[adapter.feature_layer].mean(dim=1)
    finally:
        tower.config._attn_implementation = "sdpa"
    if family == "llava_next":
        attention = attention[:, 1:, 1:]
    (expected,) = adapter.pack(context_relevance(attention, t)[..., None], inputs["image_sizes"])
    content = adapter.layout(inputs["image_sizes"])[0][:, CONTENT] > 0.5
    got = crop_context_relevance(recorded[content][None], t)[0]
    torch.testing.assert_close(got, expected[content, 0], atol=1e-6, rtol=1e-5)


class Processor:
    """What kept_tokens_picture reads from a processor: its image normalisation."""

    class image_processor:
        image_mean = CLIP_MEAN
        image_std = CLIP_STD


@torch.no_grad()
def test_pictures_draw_both_planes_with_the_kept_tokens_bright(case, tmp_path):
    name, model, inputs = case
    inputs = dict(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))
    adapter = get_adapter(model)
    with prunevlm.prune(model, "vflowopt", 0.3, layers=STAGES, recycle=False) as handle:
        model(**inputs)
        picture = handle.draw(inputs, Processor, str(tmp_path / name / "kept.png"))
    assert (tmp_path / name / "kept.png").is_file() and picture.size[0] > 0
    views, grids = adapter.pixel_views(inputs), adapter.image_grids(inputs)
    layouts = adapter.layout(inputs["image_sizes"])
    assert grids == [plane for layout in layouts for plane in adapter.planes(layout)]
    # the (30, 50) image: its base crop as the tower saw it, and tiles 1 and 2 side by side, columns 1-6 kept
    assert torch.equal(views[0], inputs["pixel_values"][0, 0])
    assert torch.equal(views[1], inputs["pixel_values"][0, 1:3].permute(1, 2, 0, 3).flatten(2)[..., 8:56])
    pictures = iter(zip(views, grids))
    grey = np.asarray(model_view(torch.zeros(3, 1, 1), CLIP_MEAN, CLIP_STD)).astype(float)[0, 0, 0]
    for kept, layout in zip([k for row in handle.stats.kept for k in row], layouts):
        content = torch.nonzero(layout[:, CONTENT] > 0.5).flatten()
        position = torch.isin(content, kept).nonzero().flatten()  # kept tokens, numbered over both planes
        offset = 0
        for plane in adapter.planes(layout):
            view, grid = next(pictures)
            assert grid == plane
            here = position[(position >= offset) & (position < offset + plane[0] * plane[1])] - offset
            drawn = np.asarray(draw_tokens(model_view(view, CLIP_MEAN, CLIP_STD), grid, here)).astype(float)
            centres = np.median(drawn[..., 0].reshape(grid[0], 8, grid[1], 8), axis=(1, 3)).flatten()  # 8 px per token, hatch aside
            bright = np.isclose(centres, grey, atol=1)
            assert set(np.flatnonzero(bright)) == set(here.tolist())
            assert np.allclose(centres[~bright], round(grey * (1 - PRUNED_SHADE)), atol=1)
            offset += plane[0] * plane[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flow_objective_and_a_search_trial_run(family):
    """The flow objective is S (every cosine 1) at a full budget and below it when pruned; one trial of the
    search returns options that meet the budget."""
    model = FAMILIES[family](layers=LAYERS)
    processor = tiny.anyres_processor(model)
    rng = np.random.default_rng(0)
    samples = [(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "w1 w2 w3")
               for h, w in ((30, 50), (100, 120), (40, 40))]
    fixed = pixel_normalisation(processor)
    full = FlowObjective(model, processor, samples, Budget(1.0))
    assert full({"layers": list(STAGES), **fixed}) == pytest.approx(len(samples), abs=1e-5)
    objective = FlowObjective(model, processor, samples, Budget(0.25))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    best = run_search(objective, study, 1, LAYERS, STAGES, fixed, progress=False)
    assert 0 < best["value"] < len(samples)
    plan = VFlowOpt(**{k: best[k] for k in ("r_v", "r_1", "t", "m", "alpha", "layers")}).plan(Budget(0.25), 729, LAYERS)
    assert abs(plan.layer_average / 729 - 0.25) < 1 / 729


def test_the_attention_signal_must_be_one_of_the_map_and_the_per_crop_view():
    g = torch.Generator().manual_seed(0)
    signals = dict(image_tokens=torch.randn(1, 16, 4, generator=g), patches=torch.randn(1, 16, 3, 2, 2, generator=g),
                   planes=((4, 4),))
    both = dict(attention=torch.rand(1, 16, 16, generator=g), crop_attention=torch.rand(1, 16, 2, 16, generator=g))
    for given, word in (({}, "neither"), (both, "both")):
        with pytest.raises(TypeError, match=f"exactly one of the signals attention .* and crop_attention .*got {word}"):
            VFlowOpt()(Budget(4), **signals, **given)
    with pytest.raises(TypeError, match="needs the tokens' layout"):
        VFlowOpt()(Budget(4), **dict(signals, planes=None), attention=both["attention"])
