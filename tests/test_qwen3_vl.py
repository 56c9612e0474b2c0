"""Qwen3-VL: DeepStack rows and visual_pos_masks follow the kept positions; in-LLM stages start above the
DeepStack layers (tiny random model from a config)."""

import pytest
import torch

import prunevlm
import tiny

GRIDS = [[(4, 6)], [(4, 4), (6, 4)], []]  # patch grids per row; a text-only row last
METHODS = ["flashvlm", "vispruner", "random", "uniform", "divprune", "cdpruner", "visionzip"]
GENERATE = dict(max_new_tokens=4, **tiny.GREEDY)


@pytest.fixture(scope="module")
def model():
    return tiny.qwen3_vl()


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS + ["vflowopt"])
def test_full_budget_is_the_identity_and_remove_restores(model, method):
    inputs = tiny.qwen_inputs(GRIDS)
    reference, ids = model(**inputs).logits, model.generate(**inputs, **GENERATE)
    options = {"layers": (2, 3)} if method == "vflowopt" else {}
    with prunevlm.prune(model, method, 1.0, **options):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, **GENERATE), ids)
    assert torch.equal(model(**inputs).logits, reference)


@torch.no_grad()
def test_deepstack_rows_follow_the_kept_tokens(model):
    """The language model receives the DeepStack rows of exactly the kept image tokens, and a visual mask
    that marks their new positions."""
    inputs = tiny.qwen_inputs([[(4, 6)]])
    seen = {}

    def observe(module, args, kwargs):
        seen.update(mask=kwargs["visual_pos_masks"], rows=kwargs["deepstack_visual_embeds"], ids=kwargs["inputs_embeds"])

    language_model = model.model.language_model
    hook = language_model.register_forward_pre_hook(observe, with_kwargs=True)
    model(**inputs)
    full = dict(seen)
    hook.remove()
    with prunevlm.prune(model, "flashvlm", 3) as handle:
        hook = language_model.register_forward_pre_hook(observe, with_kwargs=True)  # after the pruning hook
        model(**inputs)
        hook.remove()
    (kept,) = handle.stats.kept[0]
    assert int(seen["mask"].sum()) == 3 and seen["mask"].shape[1] == handle.stats.prefill_after[0]
    image = torch.nonzero(full["mask"][0]).flatten()
    assert torch.equal(seen["ids"][0][seen["mask"][0]], full["ids"][0][image[kept]])
    for level_full, level_pruned in zip(full["rows"], seen["rows"]):
        assert torch.equal(level_pruned, level_full[kept])


@torch.no_grad()
@pytest.mark.parametrize("method", ["flashvlm", "uniform", "visionzip"])
def test_left_padded_batch_with_a_text_only_row_equals_the_rows_alone(model, method):
    inputs = tiny.qwen_inputs(GRIDS)
    firsts = [sum(len(grids) for grids in GRIDS[:row]) for row in range(len(GRIDS))]
    singles = [tiny.row_inputs(inputs, row, first, len(grids), "qwen") for row, (first, grids) in enumerate(zip(firsts, GRIDS))]
    with prunevlm.prune(model, method, 3) as handle:
        tiny.assert_batch_equals_rows(model, inputs, singles, **GENERATE)
        model(**inputs)
        assert handle.stats.tokens_after == [[3], [3, 3], []]


@torch.no_grad()
def test_in_llm_stages_below_the_deepstack_layers_are_refused(model):
    inputs = tiny.qwen_inputs([[(4, 6)]])
    with prunevlm.prune(model, "vflowopt", 0.5, layers=(1, 3)):
        with pytest.raises(ValueError, match="would prune at LLM layer 1, but qwen3_vl still adds vision features "
                                             r"to the visual positions up to layer 1 \(DeepStack\)"):
            model(**inputs)
    with prunevlm.prune(model, "vflowopt", 0.5, layers=(2, 3)) as handle:
        model.generate(**inputs, **GENERATE)
    assert handle.stats.stages[0][0].layers == (2, 3)


@torch.no_grad()
def test_sampling_and_beam_search_run_pruned(model):
    inputs = tiny.qwen_inputs(GRIDS)
    with prunevlm.prune(model, "flashvlm", 3) as handle:
        torch.manual_seed(0)
        assert model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=20).shape[0] == 3
        assert model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, **tiny.GREEDY).shape[0] == 6
    assert handle.stats.tokens_after == [[3], [3], [3, 3], [3, 3], [], []]
