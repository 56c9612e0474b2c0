"""Pruning before the LLM on tiny random LLaVA, Qwen2-VL and Qwen2.5-VL, through generate() and forward()."""

import pytest
import torch

import prunevlm
import tiny
from prunevlm.models.base import Capture
from prunevlm.runtime.contract import cache_keyword, output_cache
from prunevlm.signals import attention

FAMILIES = {
    "llava": (tiny.llava, lambda: tiny.llava_inputs([1, 0, 2])),
    "qwen2_vl": (tiny.qwen2_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 8), (4, 4)]])),
    "qwen2_5_vl": (tiny.qwen2_5_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 12), (4, 4)]])),
}
IMAGES_PER_ROW = [1, 0, 2]
GENERATE = dict(max_new_tokens=6, **tiny.GREEDY)


def family_of(name):
    return "llava" if name == "llava" else "qwen"


@pytest.fixture(params=list(FAMILIES))
def case(request):
    make, inputs = FAMILIES[request.param]
    return request.param, make(), inputs()


class PrefillProbe:
    """Records the sequence length and real tokens per row that the language model receives."""

    def __init__(self, model):
        self.calls = []
        lm = model.model.language_model
        self.handle = lm.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        embeds = kwargs["inputs_embeds"]
        real = embeds.shape[1] if mask is None else mask.sum(dim=1).tolist()
        self.calls.append((embeds.shape[1], real))


@torch.no_grad()
@pytest.mark.parametrize("method", ["flashvlm", "vispruner", "random", "uniform"])
def test_full_budget_is_identity_and_remove_restores(case, method):
    """Exact on any CPU: with every token kept the handle leaves the call as it was, so the hooked and the
    unhooked model run the same computation."""
    name, model, inputs = case
    logits = model(**inputs).logits
    ids = model.generate(**inputs, **GENERATE)
    handle = prunevlm.prune(model, method, budget=1.0)
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(model.generate(**inputs, **GENERATE), ids)
    handle.remove()
    assert not handle.attached
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(model.generate(**inputs, **GENERATE), ids)


@torch.no_grad()
def test_full_budget_is_identity_when_sampling(case):
    """Exact on any CPU: the same computation and the same seed (nothing is pruned)."""
    name, model, inputs = case
    torch.manual_seed(7)
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=50)
    with prunevlm.prune(model, "flashvlm", budget=10_000):
        torch.manual_seed(7)
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=50), ids)


@torch.no_grad()
def test_prefill_and_cache_hold_text_plus_budget_per_image(case):
    name, model, inputs = case
    budget = 3
    mask = inputs["attention_mask"]
    image_id = tiny.LLAVA_IMAGE if name == "llava" else tiny.QWEN_IMAGE
    text_tokens = ((inputs["input_ids"] != image_id) & mask.bool()).sum(dim=1).tolist()
    expected = [t + budget * n for t, n in zip(text_tokens, IMAGES_PER_ROW)]
    with prunevlm.prune(model, "flashvlm", budget=budget) as handle:
        probe = PrefillProbe(model)  # registered after the pruning hook: sees what the LLM receives
        out = model(**inputs, use_cache=True)
        assert probe.calls[-1] == (max(expected), expected)
        assert output_cache(out).get_seq_length() == max(expected)
        for layer in output_cache(out).layers:
            assert layer.keys.shape[-2] == max(expected)
        assert handle.stats.prefill_after == expected
        assert handle.stats.tokens_after == [[budget] * n for n in IMAGES_PER_ROW]
        model.generate(**inputs, **GENERATE)
        prefill_lengths = [c[0] for c in probe.calls[1:] if c[0] > 1]
        assert prefill_lengths == [max(expected)]
    probe.handle.remove()


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(FAMILIES))
# vflowopt: tests/test_vflowopt.py. random draws the same for an image alone and in a batch (methods/random.py).
@pytest.mark.parametrize("method", ["flashvlm", "vispruner", "uniform", "random"])
def test_left_padded_batch_equals_rows_run_alone(name, attn, method):
    """A batch of 3 (one text-only row) gives the logits and tokens of its rows run one by one."""
    make, make_inputs = FAMILIES[name]
    model, inputs = make(attn), make_inputs()
    firsts = [sum(IMAGES_PER_ROW[:row]) for row in range(len(IMAGES_PER_ROW))]
    singles = [tiny.row_inputs(inputs, row, first, count, family_of(name))
               for row, (first, count) in enumerate(zip(firsts, IMAGES_PER_ROW))]
    with prunevlm.prune(model, method, budget=3):
        tiny.assert_batch_equals_rows(model, inputs, singles, **GENERATE)


@torch.no_grad()
@pytest.mark.parametrize("method", ["vispruner", "uniform"])
def test_cached_generation_equals_uncached(case, method):
    """Text-independent selections do not change when the prompt grows, so each uncached step re-prunes the
    same tokens: greedy generation with the KV cache gives the same tokens. The two paths sum in other
    orders, so the logits agree within 1e-5, and the tokens exactly because every step's top logit leads by
    more than twice that (checked)."""
    name, model, inputs = case
    options = dict(GENERATE, output_logits=True, return_dict_in_generate=True)
    with prunevlm.prune(model, method, budget=5):
        cached = model.generate(**inputs, **options)
        uncached = model.generate(**inputs, **options, use_cache=False)
    assert tiny.greedy_margin(cached.logits) > 2e-5
    for step_cached, step_uncached in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(step_cached, step_uncached, atol=1e-5, rtol=0)
    assert torch.equal(cached.sequences, uncached.sequences)


@torch.no_grad()
def test_manual_decoding_without_position_ids_matches_generate(case):
    """A caller that decodes itself and passes neither positions nor a mask gets generate()'s tokens: exact on
    any CPU, since both run the same forwards on the same cache (only where the positions come from differs)."""
    name, model, inputs = case
    seen = 0
    for row, count in enumerate(IMAGES_PER_ROW):
        single = tiny.row_inputs(inputs, row, seen, count, family_of(name))
        seen += count
        single.pop("attention_mask")
        with prunevlm.prune(model, "flashvlm", budget=3):
            expected = model.generate(**single, **GENERATE)[0, -6:]
            out = model(**single, use_cache=True)
            tokens = [out.logits[0, -1].argmax()]
            for _ in range(5):
                step = tokens[-1].view(1, 1)
                extra = {"mm_token_type_ids": torch.zeros_like(step)} if name != "llava" else {}
                out = model(input_ids=step, use_cache=True, **{cache_keyword(model): output_cache(out)}, **extra)
                tokens.append(out.logits[0, -1].argmax())
        assert torch.equal(torch.stack(tokens), expected)


@torch.no_grad()
def test_compact_positions_for_llava():
    """positions="compact" numbers the kept tokens 0..n-1 per row and continues from there when decoding."""
    model, inputs = tiny.llava(), tiny.llava_inputs([1, 0, 2])
    seen = []
    with prunevlm.prune(model, "vispruner", budget=4, positions="compact") as handle:
        lm = model.model.language_model
        probe = lm.register_forward_pre_hook(
            lambda m, a, kw: seen.append((kw["position_ids"].clone(), kw["attention_mask"].clone())), with_kwargs=True
        )
        cached = model.generate(**inputs, max_new_tokens=3, **tiny.GREEDY)
        probe.remove()
        lengths = handle.stats.prefill_after
        uncached = model.generate(**inputs, max_new_tokens=3, **tiny.GREEDY, use_cache=False)
    assert torch.equal(cached, uncached)
    positions, mask = seen[0]
    for row, length in enumerate(lengths):
        assert torch.equal(positions[row][mask[row].bool()], torch.arange(length))
    for step, (positions, _) in enumerate(seen[1:], start=0):
        assert positions[:, -1].tolist() == [length + step for length in lengths]


@torch.no_grad()
def test_text_only_calls_are_untouched_and_carry_no_state(case):
    name, model, inputs = case
    text_only = tiny.row_inputs(inputs, 1, 1, 0, family_of(name))
    reference = model.generate(**text_only, **GENERATE)
    reference_logits = model(**text_only).logits
    with prunevlm.prune(model, "flashvlm", budget=2) as handle:
        model.generate(**inputs, **GENERATE)
        assert torch.equal(model(**text_only).logits, reference_logits)
        assert torch.equal(model.generate(**text_only, **GENERATE), reference)
        assert handle.stats.tokens_before == [[]]


@torch.no_grad()
def test_budget_applies_per_image_and_small_images_stay_whole():
    model = tiny.qwen2_vl()
    inputs = tiny.qwen_inputs([[(4, 4), (8, 8), (4, 8)]])  # 4, 16 and 8 tokens
    with prunevlm.prune(model, "flashvlm", budget=6) as handle:
        model(**inputs)
    assert handle.stats.tokens_before == [[4, 16, 8]]
    assert handle.stats.tokens_after == [[4, 6, 6]]
    with prunevlm.prune(model, "flashvlm", budget=0.5) as handle:
        model(**inputs)
    assert handle.stats.tokens_after == [[2, 8, 4]]


@torch.no_grad()
def test_qwen_saliency_is_per_image_and_in_original_order():
    """Received attention is computed image by image and un-windowed (Qwen2.5-VL), so an image's saliency
    does not depend on the other images in the call."""
    model = tiny.qwen2_5_vl()
    both = tiny.qwen_inputs([[(8, 12), (4, 4)]])
    with prunevlm.prune(model, "vispruner", budget=1.0) as handle:
        runtime = handle.runtime
        runtime.needed.add("saliency")
        tokens = model.model.get_image_features(both["pixel_values"], both["image_grid_thw"]).pooler_output
        together = [s["saliency"] for s in runtime.capture.match(list(tokens))[0]]
        first = both["pixel_values"][: 8 * 12]
        tokens = model.model.get_image_features(first, both["image_grid_thw"][:1]).pooler_output
        alone = runtime.capture.match(list(tokens))[0][0]["saliency"]
    torch.testing.assert_close(together[0], alone)
    assert together[0].shape == (24,) and together[1].shape == (4,)


@torch.no_grad()
def test_saved_model_loads_and_prunes(tmp_path):
    """The real loading path: from_pretrained of a local folder, then pruning."""
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with prunevlm.prune(model, "flashvlm", budget=4):
        expected = model(**inputs).logits
    with prunevlm.prune(loaded, "flashvlm", budget=4):
        torch.testing.assert_close(loaded(**inputs).logits, expected)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 10**9])
@pytest.mark.parametrize("method, signal", [("vispruner", "saliency"), ("vflowopt", "attention")])
def test_llava_attention_signals_equal_eager_attention(monkeypatch, method, signal, chunk):
    """The hook's CLS row (saliency) and patch-to-patch map (VFlowOpt's attention), from the feature layer's
    own q/k projections with the tower on SDPA, equal eager attention averaged over heads, whether the
    heads are taken one at a time (chunk = 1 logit) or all at once."""
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    model, inputs = tiny.llava(), tiny.llava_inputs([2])
    with prunevlm.prune(model, method, budget=1.0) as handle:
        tokens = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        recorded = torch.stack([s[signal] for s in handle.runtime.capture.match(list(tokens))[0]])
    eager = tiny.llava(attn="eager")
    attentions = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    layer = attentions[len(attentions) + model.config.vision_feature_layer]  # its output is hidden_states[-2]
    expected = layer[:, :, 0, 1:] if signal == "saliency" else layer[:, :, 1:, 1:]
    torch.testing.assert_close(recorded, expected.mean(dim=1), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_qwen_received_attention_sums_to_the_image_token_count():
    """Each image's patches receive exactly its own queries' attention: per-image softmax, 2x2 average."""
    model = tiny.qwen2_5_vl()
    inputs = tiny.qwen_inputs([[(8, 12), (4, 8)]])
    with prunevlm.prune(model, "vispruner", budget=1.0) as handle:
        tokens = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        saliency = [s["saliency"] for s in handle.runtime.capture.match(list(tokens))[0]]
    assert [float(s.sum()) for s in saliency] == pytest.approx([24.0, 8.0], rel=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method", ["flashvlm", "vflowopt"])
def test_beam_search_and_several_returned_sequences(case, method):
    """generate() repeats the encoder outputs for each beam; the recorded signals follow them. At full
    budget beams are unchanged; pruned, every returned sequence of a row is the row's own."""
    name, model, inputs = case
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, **tiny.GREEDY)
    reference = model.generate(**inputs, **beams)
    with prunevlm.prune(model, method, 1.0):
        assert torch.equal(model.generate(**inputs, **beams), reference)
    with prunevlm.prune(model, method, 0.5) as handle:
        pruned = model.generate(**inputs, **beams)
        assert handle.stats.tokens_before[0] == handle.stats.tokens_before[1]  # rows 0 and 1 are copies of row 0
    assert pruned.shape[0] == 6


@torch.no_grad()
@pytest.mark.parametrize("method,budget", [("flashvlm", 3), ("vflowopt", 0.4)])
def test_bfloat16_models(method, budget):
    """Signals are computed in fp32; kept and recycled tokens go back to the model's dtype."""
    model = tiny.qwen2_5_vl(layers=4).to(torch.bfloat16)
    inputs = tiny.qwen_inputs([[(4, 8)], [], [(8, 12), (4, 4)]])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    reference = model.generate(**inputs, max_new_tokens=3, **tiny.GREEDY)
    with prunevlm.prune(model, method, 1.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, **tiny.GREEDY), reference)
    with prunevlm.prune(model, method, budget) as handle:
        out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert all(kept <= before for row_b, row_a in zip(handle.stats.tokens_before, handle.stats.tokens_after)
               for before, kept in zip(row_b, row_a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_recorded_signals_are_found_by_identical_tokens_only(dtype):
    capture = Capture()
    tokens = torch.randn(2, 6, 16).to(dtype)
    capture.record("tokens", list(tokens))
    capture.record("saliency", [torch.zeros(6), torch.ones(6)])
    found, _ = capture.match([tokens[1].clone(), tokens[0].clone()])
    assert [float(record["saliency"][0]) for record in found] == [1.0, 0.0]
    # same shape and the same first 8 columns (the lookup key), one value changed past them
    changed = tokens[0].clone()
    changed[5, 12] += 1
    with pytest.raises(RuntimeError, match="not encoded while pruning was attached"):
        capture.match([changed])
