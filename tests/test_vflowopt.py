"""VFlowOpt: importance map, stage 0 with recycling, the layer-averaged budget, and the in-LLM stages."""

import pytest
import torch

import prunevlm
import tiny
from prunevlm.budget import Budget
from prunevlm.methods.vflowopt import VFlowOpt, context_relevance, default_layers, importance, recycle
from prunevlm.runtime.contract import output_cache
from prunevlm.signals.entropy import CLIP_MEAN, CLIP_STD, grey_levels, patch_entropy


def test_context_relevance_averages_the_rows_of_global_tokens():
    attention = torch.tensor([[[0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.3, 0.5, 0.2]]])
    # received: [0.2, 0.633, 0.167]; mean 1/3; t = 1.5 -> only token 1 is global
    assert torch.allclose(context_relevance(attention, 1.5), attention[:, 1])
    # t = 0.55: tokens 0 and 1 (above 0.183); t = 0.3: all three (above 0.1)
    assert torch.allclose(context_relevance(attention, 0.55), attention[:, :2].mean(dim=1))
    assert torch.allclose(context_relevance(attention, 0.3), attention.mean(dim=1))


def test_empty_global_set_falls_back_without_nan():
    attention = torch.softmax(torch.randn(2, 20, 20), dim=-1)
    relevance = context_relevance(attention, 1e6)
    assert torch.isfinite(relevance).all()
    top = attention.mean(dim=1).argmax(dim=-1)
    assert torch.allclose(relevance, attention[torch.arange(2), top])


def test_importance_adds_the_softmax_of_entropy():
    attention = torch.softmax(torch.randn(1, 9, 9), dim=-1)
    entropy = torch.rand(1, 9) * 7
    expected = context_relevance(attention, 2.0) + 0.3 * torch.softmax(entropy, dim=-1)
    assert torch.allclose(importance(attention, entropy, 2.0, 0.3), expected)


def normalised(levels: torch.Tensor) -> torch.Tensor:
    """Raw grey levels [h, w] (0-255) as CLIP-normalised RGB [3, h, w]."""
    rgb = levels.float()[None].expand(3, -1, -1) / 255
    return (rgb - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def test_patch_entropy_is_the_grey_level_histogram_entropy_in_bits():
    flat = torch.full((14, 14), 90)
    halves = torch.cat([torch.full((7, 14), 30), torch.full((7, 14), 200)])
    four = torch.arange(4).repeat_interleave(49).view(14, 14) * 60
    levels = grey_levels(torch.stack([normalised(flat), normalised(halves), normalised(four)]))
    assert torch.equal(levels[1], halves.float())  # raw intensities recovered
    assert patch_entropy(levels).tolist() == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)


def cast_inputs() -> torch.Tensor:
    """Normalised pixel blocks [5, 3, 14, 14] whose ×255 covers negatives, values above 255 and fractions."""
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(4, 3, 14, 14, generator=g) * 4 - 2  # x * 255 in [-510, 510)
    edges = torch.tensor([-100.7, 300.2, -255.0, -256.4, -0.5, -1.0, 255.9, 256.0, 511.7, -300.3, 12.6, 0.0]) / 255
    edge = torch.cat([edges, torch.zeros(3 * 196 - edges.numel())]).view(1, 3, 14, 14)
    return torch.cat([wide, edge])


def test_code_entropy_wrap_is_the_pytorch_cpu_cast():
    """entropy="code" with the default code_cast="wrap" equals torch's own float -> uint8 cast on CPU of the
    official (x * 255), then the channel mean and rounding (docs/methods.md, VFlowOpt)."""
    x = cast_inputs()
    cast = (x * 255).to(torch.uint8)
    assert torch.tensor([-100.7, 300.2, -255.0]).to(torch.uint8).tolist() == [156, 44, 1]  # it wraps on this CPU
    expected = cast.float().mean(dim=-3).round()
    assert torch.equal(grey_levels(x, mode="code"), expected)
    assert torch.equal(grey_levels(x, mode="code", code_cast="wrap"), expected)


def test_code_entropy_saturate_is_a_clamp_of_the_product():
    x = cast_inputs()
    expected = (x * 255).clamp(0, 255).to(torch.uint8).float().mean(dim=-3).round()
    assert torch.equal(grey_levels(x, mode="code", code_cast="saturate"), expected)
    assert not torch.equal(expected, grey_levels(x, mode="code"))  # the two readings differ here


def test_code_entropy_readings_on_pixels_darker_than_the_mean():
    dark = normalised(torch.cat([torch.full((7, 14), 10), torch.full((7, 14), 60)]))  # both below the mean
    assert patch_entropy(grey_levels(dark[None])).item() == pytest.approx(1.0)
    # saturating, every dark pixel becomes 0; wrapping keeps the two levels apart
    assert patch_entropy(grey_levels(dark[None], mode="code", code_cast="saturate")).item() == pytest.approx(0.0, abs=1e-6)
    assert patch_entropy(grey_levels(dark[None], mode="code", code_cast="wrap")).item() == pytest.approx(1.0)


def test_vflowopt_code_cast_option_reaches_the_entropy():
    g = torch.Generator().manual_seed(0)
    attention = torch.softmax(torch.randn(1, 5, 5, generator=g), dim=-1)
    patches = cast_inputs()[None]
    assert VFlowOpt().code_cast == "wrap" and VFlowOpt().entropy == "paper"
    for cast in ("wrap", "saturate"):
        entropy = patch_entropy(grey_levels(patches, mode="code", code_cast=cast))
        expected = importance(attention, entropy, 2.0, 0.5)
        assert torch.equal(VFlowOpt(t=2.0, alpha=0.5, entropy="code", code_cast=cast).scores(attention, patches), expected)
    paper = importance(attention, patch_entropy(grey_levels(patches)), 2.0, 0.5)
    for cast in ("wrap", "saturate"):  # the paper mode ignores the cast
        assert torch.equal(VFlowOpt(t=2.0, alpha=0.5, code_cast=cast).scores(attention, patches), paper)
    with pytest.raises(ValueError, match="vflowopt: option code_cast must be one of 'wrap', 'saturate', got 'clamp'"):
        VFlowOpt(entropy="code", code_cast="clamp")
    with pytest.raises(ValueError, match="code_cast must be 'wrap' or 'saturate', got 'clamp'"):
        grey_levels(patches, mode="code", code_cast="clamp")


def test_recycling_keeps_the_exact_count_and_averages_each_cell():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(36, generator=g)
    tokens = torch.randn(36, 5, generator=g)
    for count in (1, 3, 8, 20, 35):
        keep, values, weights, is_recycled = (x[0] for x in recycle(scores[None], tokens[None], ((6, 6),), count, cell=3.0))
        assert keep.numel() == count and (keep.diff() > 0).all()
        originals = (values == tokens[keep]).all(dim=1)
        assert (originals | is_recycled).all()
        assert torch.equal(weights, scores[keep])
        recycled = keep[~originals]
        cell = (recycled // 6 // 3) * 2 + (recycled % 6) // 3
        assert cell.unique().numel() == cell.numel()  # one recycled token per cell
    keep, values, _, _ = (x[0] for x in recycle(scores[None], tokens[None], ((6, 6),), 8, cell=3.0))
    ranked = scores.argsort(descending=True)
    kept_originals = set(keep[(values == tokens[keep]).all(dim=1)].tolist())
    pruned = [i for i in range(36) if i not in set(ranked[: len(kept_originals)].tolist())]
    cells = {}
    for i in pruned:
        cells.setdefault((i // 6 // 3, i % 6 // 3), []).append(i)
    for members in cells.values():
        slot = max(members, key=lambda i: scores[i])
        w = scores[members]
        expected = (w[:, None] * tokens[members]).sum(0) / w.sum()
        row = (keep == slot).nonzero().item()
        assert torch.allclose(values[row], expected, atol=1e-6)


def test_plan_meets_the_layer_averaged_budget():
    method = VFlowOpt()
    for fraction in (0.05, 0.1, 0.25, 0.5, 0.8):
        for tokens, depth in ((576, 28), (576, 8), (144, 4), (729, 32)):
            plan = method.plan(Budget(fraction), tokens, depth)
            n0, n1, n2 = plan.counts
            assert n0 >= n1 >= n2 >= 1
            assert abs(plan.layer_average / tokens - fraction) <= 1.0 / tokens
    assert VFlowOpt().plan(Budget(1.0), 576, 28).counts == (576, 576, 576)
    assert VFlowOpt().plan(Budget(64), 576, 28).layer_average == pytest.approx(64, abs=1)


def test_released_configs_reproduce_their_schedules():
    """docs/vflowopt.md §3.4 on LLaVA-OV-7B (N = 729, 28 layers, k = 9, 18)."""
    plan = VFlowOpt(r_v=0.1166, r_1=1.0).plan(Budget(0.10), 729, 28)
    assert plan.layers == (9, 18)
    assert plan.counts[0] == round(0.1166 * 729)
    assert plan.counts[2] / plan.counts[1] == pytest.approx(0.6011, abs=0.02)


def test_infeasible_ratios_are_refused():
    with pytest.raises(ValueError, match="cannot meet"):
        VFlowOpt(r_v=0.9, r_1=0.9).plan(Budget(0.1), 576, 28)


def test_default_layers_scale_the_official_ones():
    assert default_layers(28) == (9, 18)
    assert default_layers(32) == (10, 21)
    assert default_layers(8) == (3, 5)


FAMILIES = {
    "llava": (tiny.llava, lambda: tiny.llava_inputs([1, 0, 2])),
    "qwen2_vl": (tiny.qwen2_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 8), (4, 4)]])),
    "qwen2_5_vl": (tiny.qwen2_5_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 12), (4, 4)]])),
}


@pytest.fixture(params=list(FAMILIES))
def case(request):
    make, inputs = FAMILIES[request.param]
    return request.param, make(layers=4), inputs()


@torch.no_grad()
def test_full_budget_is_identity(case):
    """A full budget leaves the logits and tokens as without hooks. Exact: the same computation on the same inputs,
    in one process (the hooks must change nothing the model computes there), not two computation paths."""
    name, model, inputs = case
    logits = model(**inputs).logits
    ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with prunevlm.prune(model, "vflowopt", 1.0):
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), ids)


@torch.no_grad()
def test_stages_shorten_the_cache_of_later_layers(case):
    name, model, inputs = case
    with prunevlm.prune(model, "vflowopt", 0.4, layers=(1, 2)) as handle:
        cache = output_cache(model(**inputs, use_cache=True))
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        stats = handle.stats
    text = [p - sum(a) for p, a in zip(stats.prefill_after, stats.tokens_after)]
    expected = []
    for stage in range(3):
        expected.append(max(t + sum(plan.counts[stage] for plan in plans) for t, plans in zip(text, stats.stages)))
    assert lengths == [expected[0], expected[1], expected[2], expected[2]]
    assert lengths[0] > lengths[1] > lengths[2]
    for row in stats.stages:
        for plan in row:
            assert plan.counts[0] >= plan.counts[1] >= plan.counts[2]


@torch.no_grad()
def test_generation_equals_the_uncached_reference(case):
    """Importance is purely visual, so each uncached step keeps the same sets at every stage. Logits within
    1e-5 (the cache changes the summation order); the tokens exactly, which that tolerance decides since
    every step's top logit leads by more than 2e-5 (checked)."""
    name, model, inputs = case
    with prunevlm.prune(model, "vflowopt", 0.4, layers=(1, 2)):
        cached = model.generate(**inputs, max_new_tokens=6, **tiny.GREEDY, output_logits=True, return_dict_in_generate=True)
        assert tiny.greedy_margin(cached.logits) > 2e-5
        uncached = model.generate(**inputs, max_new_tokens=6, **tiny.GREEDY, use_cache=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", list(FAMILIES))
def test_batch_with_a_text_only_row_equals_rows_alone(name):
    """Logits within 1e-5 (the batch sums in other orders); the tokens exactly, which that tolerance decides
    since every step's top logit leads by more than 2e-5 (checked)."""
    make, make_inputs = FAMILIES[name]
    model, inputs = make(layers=4), make_inputs()
    with prunevlm.prune(model, "vflowopt", 0.4, layers=(1, 2)):
        batch = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert tiny.greedy_margin(batch.logits) > 2e-5
        seen = 0
        for row, count in enumerate([1, 0, 2]):
            single = tiny.row_inputs(inputs, row, seen, count, "llava" if name == "llava" else "qwen")
            seen += count
            alone = model.generate(**single, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
            assert torch.equal(alone.sequences[0, -5:], batch.sequences[row, -5:])
            for step_batch, step_alone in zip(batch.logits, alone.logits):
                torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_text_only_prompt_after_an_image_prompt_is_untouched():
    """A text-only prompt after a pruned one gets the logits of the unhooked model. Exact: the same computation on
    the same inputs, in one process (the hooks must change nothing the model computes there), not two
    computation paths."""
    model, inputs = tiny.llava(layers=4), tiny.llava_inputs([1, 0])
    text_only = tiny.row_inputs(inputs, 1, 1, 0, "llava")
    reference = model(**text_only).logits
    with prunevlm.prune(model, "vflowopt", 0.3, layers=(1, 2)):
        model.generate(**inputs, max_new_tokens=2)
        assert torch.equal(model(**text_only).logits, reference)


def test_config_round_trip_and_validation(tmp_path):
    from prunevlm.config import save_config

    path = tmp_path / "calib.json"
    save_config(str(path), "vflowopt", 0.25, {"r_v": 0.3, "r_1": 0.9, "t": 20.0, "m": 12.0, "alpha": 0.1}, objective=27.1)
    model = tiny.llava(layers=4)
    with prunevlm.prune(model, "vflowopt", config=str(path)) as handle:
        assert handle.method.r_v == 0.3 and handle.budget == Budget(0.25)
    with pytest.raises(ValueError, match="calibrated for budget 0.25"):
        prunevlm.prune(model, "vflowopt", 0.1, config=str(path))
    with pytest.raises(ValueError, match="is for 'vflowopt'"):
        prunevlm.prune(model, "flashvlm", config=str(path))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "prunevlm-config/1", "method": "vflowopt", "budget": 0.25, "options": {"r_v": 3, "r_1": 0.5, "t": 1, "m": 10, "alpha": 0}}')
    with pytest.raises(ValueError, match="option r_v must be in"):
        prunevlm.prune(model, "vflowopt", config=str(bad))


@pytest.mark.parametrize("fraction", [0.55, 0.7, 0.8889, 0.95, 0.999])
def test_default_plans_meet_budgets_above_the_released_schedules(fraction):
    """The released configs stop at T = 0.5; above what they keep with r_v = 1, r_1 rises to meet T."""
    for tokens, depth, layers in ((729, 28, None), (144, 4, (1, 3))):
        plan = VFlowOpt(layers=layers).plan(Budget(fraction), tokens, depth)
        assert abs(plan.layer_average / tokens - fraction) < 1 / tokens
        assert plan.counts[0] >= plan.counts[1] >= plan.counts[2]


def test_the_processors_normalisation_fills_the_pixel_options_nobody_set():
    """generate, eval and the lmms-eval model give VFlowOpt the checkpoint's normalisation (SigLIP: 0.5)
    unless the user's options or config set it; methods without pixel options are left as they are."""
    from types import SimpleNamespace

    from prunevlm.loading import with_processor_normalisation
    from prunevlm.methods import make_method

    siglip = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3))
    filled = with_processor_normalisation(make_method("vflowopt", t=3.0), siglip, {"t"})
    assert filled.pixel_mean == filled.pixel_std == (0.5, 0.5, 0.5) and filled.t == 3.0
    chosen = make_method("vflowopt", pixel_mean=(0.4, 0.4, 0.4))
    assert with_processor_normalisation(chosen, siglip, {"pixel_mean"}) is chosen
    flashvlm = make_method("flashvlm")
    assert with_processor_normalisation(flashvlm, siglip, set()) is flashvlm
