"""fastv, pdrop, dart and sparsevlm: the worked checks of ../shared/reference/baselines.md §1.6, §6.6, §8.6 and
§7.6, the budget
schedules, the LLM-side signals, and the in-LLM stages on tiny LLaVA and Qwen2-VL models."""

import time

import pytest
import torch

import prunevlm
import tiny
from prunevlm.budget import Budget
from prunevlm.methods import METHODS
from prunevlm.methods.base import Plan
from prunevlm.methods.dart import DART, least_duplicated, official_count
from prunevlm.methods.fastv import FastV
from prunevlm.methods.pdrop import PyramidDrop, pyramid_counts, solve_ratio
from prunevlm.methods.sparsevlm import TABLES, SparseVLM, dpc_knn, kept_for_total, raters, recycled_count
from prunevlm.models import get_adapter
from prunevlm.runtime.contract import output_cache

IN_LLM = ("fastv", "pdrop", "dart", "sparsevlm")


def text_mask(length: int, image) -> torch.Tensor:
    """`choose`'s text mask for an unpadded row of `length` with one image at columns `image`."""
    text = torch.ones(length, dtype=torch.bool)
    text[torch.as_tensor(image)] = False
    return text


# -- FastV (§1) ---------------------------------------------------------------------------------------------

def test_fastv_keeps_the_most_attended_image_tokens():
    """§1.6.1: head-mean image slice (0.10, 0.50, 0.20, 0.40), m = 2 keeps offsets 1 and 3."""
    row = torch.tensor([[0.05, 0.05, 0.10, 0.50, 0.20, 0.40, 0.3]])  # one head; the image spans columns 2..5
    picks = FastV().choose(1, 2, torch.tensor([2, 3, 4, 5]), torch.ones(7, dtype=torch.bool), text_mask(7, [2, 3, 4, 5]),
                           last_attention=row)
    assert picks.tolist() == [1, 3]


def test_fastv_averages_per_head_softmax_rows_without_renormalising():
    """§1.6.2: head 0 gives the image little mass, head 1 most of it; renormalising over the image keys would
    weight head 0 up and rank token 0 first, the official head mean of the full rows ranks token 1 first."""
    rows = torch.tensor([[0.90, 0.08, 0.02],   # head 0: text column 0, image columns 1, 2
                         [0.10, 0.40, 0.50]])  # head 1
    image = torch.tensor([1, 2])
    renormalised = (rows[:, image] / rows[:, image].sum(dim=1, keepdim=True)).mean(dim=0)
    assert renormalised.argmax().item() == 0
    picks = FastV().choose(1, 1, image, torch.ones(3, dtype=torch.bool), text_mask(3, [1, 2]), last_attention=rows)
    assert picks.tolist() == [1]


def test_fastv_budget_mappings():
    """§1.3 and §1.6.4: K = 2 of 32 layers; 64/128/192 map to m = 30/98/166; m = 144 averages 171."""
    assert Plan((576, 144), (2,), 32).layer_average == 171
    assert FastV().plan(Budget(171), 576, 32).counts == (576, 144)
    assert [FastV().plan(Budget(k), 576, 32).counts[1] for k in (64, 128, 192)] == [30, 98, 166]
    assert FastV(budget_convention="kept").plan(Budget(64), 576, 32).counts == (576, 64)
    assert FastV(layer=3).plan(Budget(64), 576, 32).layers == (3,)
    assert FastV().plan(Budget(64), 576, 28).layers == (2,)  # 2/32 of 28 layers
    with pytest.raises(ValueError, match="out of reach"):
        FastV().plan(Budget(32), 576, 32)  # below K·N/L = 36


# -- PyramidDrop (§6) ---------------------------------------------------------------------------------------

def test_pdrop_defaults_keep_halves_and_average_270():
    """§6.6.1: λ = 0.5 at [8, 16, 24] keeps 288 / 144 / 72 and averages 270; budget 270 solves to it."""
    assert pyramid_counts(576, 0.5, 3) == (576, 288, 144, 72)
    plan = PyramidDrop().plan(Budget(270), 576, 32)
    assert plan.counts == (576, 288, 144, 72) and plan.layers == (8, 16, 24) and plan.layer_average == 270


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_pdrop_solves_the_ratio_for_early_stages(budget):
    """§6.3: (2, 8, 16) reaches 192/128/64 by λ alone (the maintainer's advice), to within integer steps."""
    plan = PyramidDrop(layers=(2, 8, 16)).plan(Budget(budget), 576, 32)
    assert abs(plan.layer_average - budget) < 0.5
    ratio = solve_ratio(budget, 576, (2, 8, 16), 32)
    assert plan.counts == pyramid_counts(576, ratio, 3)
    assert plan.counts[1] > plan.counts[2] > plan.counts[3]


def test_pdrop_refuses_budgets_below_its_first_stage():
    """§6.3: [8, 16, 24] cannot go below 144 = 8·576/32."""
    with pytest.raises(ValueError, match="move the first stage earlier"):
        PyramidDrop().plan(Budget(64), 576, 32)
    assert PyramidDrop().plan(Budget(1.0), 576, 32).counts == (576,) * 4


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_last_attention_is_eager_attentions_last_row_at_that_layer(family):
    """§6.6.3 (and FastV's signal): the recomputed row equals eager attention's last row at layer l, on the
    input of layer l (Qwen2-VL: grouped-query heads and M-RoPE; Qwen3-VL: per-head q/k norms too). Within
    1e-6: the two compute the same softmax in fp32 through different kernels."""
    make = {"llava": tiny.llava, "qwen2_vl": tiny.qwen2_vl, "qwen3_vl": tiny.qwen3_vl}[family]
    model = make(attn="eager", layers=3)
    inputs = tiny.llava_inputs([1]) if family == "llava" else tiny.qwen_inputs([[(4, 4)]])
    adapter = get_adapter(model)
    seen = {}
    handle = adapter.decoder_layers()[2].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs, hidden=(args or (kwargs["hidden_states"],))[0]),
        with_kwargs=True)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
        handle.remove()
        row = adapter.last_attention(2, seen["hidden"], seen["position_embeddings"], inputs["attention_mask"])
    torch.testing.assert_close(row, attentions[2][:, :, -1].float(), atol=1e-6, rtol=0)


# -- DART (§8) ----------------------------------------------------------------------------------------------

def test_dart_official_kept_count():
    """§8.3 and §8.6.1: p_i + (p_i + p_t)·⌊B/(p_i + p_t)⌋ gives 196 / 132 / 68 for B = 192 / 128 / 64."""
    assert [official_count(b, 576, 4, 4) for b in (192, 128, 64)] == [196, 132, 68]
    assert DART(quota="official", budget_convention="kept").plan(Budget(128), 576, 32).counts == (576, 132)
    assert DART(budget_convention="kept").plan(Budget(128), 576, 32).counts == (576, 128)
    assert Plan((576, 132), (2,), 32).layer_average == 159.75


def test_dart_pivot_takes_the_least_similar_tokens():
    """§8.6.2: one pivot, pool cosines (0.9, 0.1, -0.5, 0.3), q = 2 picks the tokens at -0.5 and 0.1."""
    taken = ~least_duplicated(torch.tensor([[0.9, 0.1, -0.5, 0.3]]), torch.ones(4, dtype=torch.bool), [2])
    assert torch.nonzero(taken).flatten().tolist() == [1, 2]


def test_dart_pivot_order_matters_and_is_pinned():
    """§8.6.4: quotas come from a shrinking pool, so the visiting order changes the picks; `choose` visits the
    pivots by descending key norm."""
    similarity = torch.tensor([[0.0, 0.1, 0.9], [0.0, 0.9, 0.1]])  # both pivots want token 0 most
    pool = torch.ones(3, dtype=torch.bool)
    assert least_duplicated(similarity, pool, [1, 1]).tolist() == [False, True, False]
    assert least_duplicated(similarity.flip(0), pool, [1, 1]).tolist() == [False, False, True]
    # image columns 1..6 (column 3 the image pivot), text pivot at column 8; keys: L1 norms 1 and 9
    keys = torch.zeros(9, 2)
    keys[3, 0], keys[8, 0] = 1.0, 9.0
    hidden = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    columns = torch.arange(1, 7)
    picks = DART(image_pivots=1, text_pivots=1).choose(1, 4, columns, torch.ones(9, dtype=torch.bool),
                                                      text_mask(9, columns),
                                                      prior_keys=keys, normed_input=hidden)
    unit = torch.nn.functional.normalize(hidden.double(), dim=-1)  # cosines in fp64 rounded to fp32, as choose's
    start = torch.ones(6, dtype=torch.bool)
    start[2] = False
    similarity = (unit[[8, 3]] @ unit[columns].T).float()
    expected = least_duplicated(similarity, start, [1, 2])  # text pivot first, remainder last
    assert picks.tolist() == torch.nonzero(~expected).flatten().tolist()


def test_dart_keeps_exact_unique_ascending_counts():
    """§8.6.3: no duplicates, exactly the planned count, on random signals."""
    generator = torch.Generator().manual_seed(1)
    for count in (3, 5, 9, 12):
        keys, hidden = torch.randn(30, 8, generator=generator), torch.randn(30, 16, generator=generator)
        picks = DART().choose(1, count, torch.arange(4, 20), torch.ones(30, dtype=torch.bool),
                              text_mask(30, torch.arange(4, 20)),
                              prior_keys=keys, normed_input=hidden)
        assert picks.numel() == count and torch.equal(picks, picks.unique())


# -- SparseVLM (§7) -----------------------------------------------------------------------------------------

KEPT = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}  # the v1.5 n_keep tables


@pytest.mark.parametrize("budget", list(TABLES))
def test_sparsevlm_tables_with_recycling_give_the_stage_counts(budget):
    """§7.6.1: n_keep plus the recycled clusters gives §7.2's counts; kept_for_total inverts it."""
    alive = 576
    for kept, total in zip(KEPT[budget], TABLES[budget]):
        assert kept + recycled_count(alive - kept) == total
        assert kept_for_total(alive, total, True) == kept
        alive = total


def test_sparsevlm_counters_and_the_plan_for_the_192_table():
    """§7.3: the code's output-convention counter gives 192.03125 for the 192 table; what the layers process
    averages 206.5, and that budget plans the table's counts back."""
    n1, n2, n3 = TABLES[192]
    assert (2 * 576 + 4 * n1 + 9 * n2 + 17 * n3) / 32 == 192.03125
    assert Plan((576, n1, n2, n3), (3, 7, 16), 32).layer_average == 206.5
    assert SparseVLM().plan(Budget(206.5 / 576), 576, 32).counts == (576, n1, n2, n3)
    for budget in (192, 128, 64):
        plan = SparseVLM().plan(Budget(budget), 576, 32)
        assert abs(plan.layer_average - budget) < 0.5 and plan.counts[1] >= plan.counts[2] >= plan.counts[3]


def test_sparsevlm_raters_and_recycling_constants():
    """§7.6.2: p = (0.5, 0.3, 0.2) makes text token 0 the only rater; §7.6.3: D = 276 gives 9 clusters."""
    embeddings = torch.zeros(4, 3)
    embeddings[0, 0] = 1.0  # the one visual row
    embeddings[1:, 0] = torch.tensor([0.5, 0.3, 0.2]).log()  # V·T = log p, so softmax over the text is p
    assert raters(embeddings, torch.tensor([0]), torch.tensor([1, 2, 3])).tolist() == [1]
    assert raters(torch.ones(3, 2), torch.tensor([0]), torch.tensor([1, 2])).tolist() == [1, 2]  # uniform: all rate
    assert recycled_count(276) == 9 and recycled_count(0) == 0


def test_sparsevlm_clusters_two_blobs_apart():
    """§7.6.4: two well-separated blobs with c = 2: one centre per blob."""
    generator = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(6, 4, generator=generator) * 0.01, 5 + torch.randn(5, 4, generator=generator) * 0.01])
    assignment = dpc_knn(blobs, 2)
    assert assignment[:6].unique().numel() == 1 and assignment[6:].unique().numel() == 1
    assert assignment[0] != assignment[6]


def test_sparsevlm_recycled_slots_average_their_cluster():
    """choose keeps count tokens: originals plus recycled slots whose weights average their members."""
    generator = torch.Generator().manual_seed(2)
    length, heads = 30, 2
    columns = torch.arange(2, 22)
    picks, slots, weights = SparseVLM().choose(
        1, 8, columns, torch.ones(length, dtype=torch.bool), text_mask(length, columns),
        layer_queries=torch.randn(heads, length, 4, generator=generator),
        layer_keys=torch.randn(heads, length, 4, generator=generator),
        input=torch.randn(length, 8, generator=generator), embeddings=torch.randn(length, 8, generator=generator))
    assert picks.numel() == 8 and torch.equal(picks, picks.unique()) and torch.isin(slots, picks).all()
    assert torch.allclose(weights.sum(dim=-1), torch.ones(slots.numel()))
    assert (weights[torch.arange(slots.numel()), slots] > 0).all()  # each slot is one of its members


# -- on tiny models -----------------------------------------------------------------------------------------

FAMILIES = {
    "llava": (tiny.llava, lambda: tiny.llava_inputs([1, 0, 2]), "llava"),
    "qwen2_vl": (tiny.qwen2_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 8), (4, 4)]]), "qwen"),
    "qwen2_5_vl": (tiny.qwen2_5_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 12), (4, 4)]]), "qwen"),
}
CASES = [(method, family) for method in IN_LLM for family in FAMILIES]


def test_registered_as_in_llm_methods_that_select_only_on_a_model():
    for name in IN_LLM:
        assert METHODS[name].prunes_in_llm and METHODS[name].llm_signals
        with pytest.raises(NotImplementedError, match="prunevlm.prune"):
            prunevlm.select(name, 4, image_tokens=torch.randn(1, 16, 8))
        assert prunevlm.select(name, 16, image_tokens=torch.randn(1, 16, 8)).keep.tolist() == [list(range(16))]


@torch.no_grad()
@pytest.mark.parametrize("method", IN_LLM)
def test_budgets_the_first_layers_already_exceed_are_refused(method):
    """On 4 layers every method keeps all 16 tokens in layer 0: a layer average of 4 is out of reach."""
    model, inputs = tiny.llava(layers=4), tiny.llava_inputs([1])
    with prunevlm.prune(model, method, 0.25), pytest.raises(ValueError, match="out of reach"):
        model(**inputs)


@torch.no_grad()
@pytest.mark.parametrize("method,family", CASES)
def test_full_budget_is_identity_and_remove_restores(method, family):
    """A full budget leaves the logits and tokens as without hooks, and remove() restores them. Exact: the same
    computation on the same inputs, in one process (the hooks must change nothing the model computes there), not
    two computation paths."""
    make, make_inputs, _ = FAMILIES[family]
    model, inputs = make(layers=4), make_inputs()
    logits = model(**inputs).logits
    ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with prunevlm.prune(model, method, 1.0):
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ids)
    handle = prunevlm.prune(model, method, 0.5)
    assert not torch.equal(model(**inputs).logits, logits)
    handle.remove()
    assert torch.equal(model(**inputs).logits, logits)


@torch.no_grad()
@pytest.mark.parametrize("method,family", CASES)
def test_cache_lengths_follow_the_plan_and_its_layer_average(method, family):
    """Each layer's cache holds the text plus the stage's visual tokens; per image alone, the visual tokens
    the layers' caches hold average to the plan's layer average exactly."""
    make, make_inputs, kind = FAMILIES[family]
    model, inputs = make(layers=4), make_inputs()
    with prunevlm.prune(model, method, 0.5) as handle:
        lengths = [layer.keys.shape[-2] for layer in output_cache(model(**inputs, use_cache=True)).layers]
        stats = handle.stats
        plans = stats.stages
        assert any(plan.counts[-1] < plan.counts[0] for row in plans for plan in row)
        text = [p - sum(a) for p, a in zip(stats.prefill_after, stats.tokens_after)]
        bounds = (0, *plans[0][0].layers, 4)
        expected = [max(t + sum(plan.counts[s] for plan in row) for t, row in zip(text, plans))
                    for s in range(len(bounds) - 1) for _ in range(bounds[s], bounds[s + 1])]
        assert lengths == expected
        alone = tiny.row_inputs(inputs, 0, 0, 1, kind)
        lengths = [layer.keys.shape[-2] for layer in output_cache(model(**alone, use_cache=True)).layers]
        stats = handle.stats
        visual = [n - (stats.prefill_after[0] - stats.tokens_after[0][0]) for n in lengths]
        assert sum(visual) / len(visual) == stats.layer_average[0][0] == stats.stages[0][0].layer_average


@torch.no_grad()
@pytest.mark.parametrize("method", IN_LLM)
def test_the_choice_inside_the_llm_is_timed_as_selection(method, monkeypatch):
    """stats.selection_ms covers the choice at the deciding layer: a `choose` made 40 ms slower per call shows
    up in llm_choice_ms and in selection_ms, once per image the stage prunes."""
    make, make_inputs, _ = FAMILIES["llava"]
    model, inputs = make(layers=4), make_inputs()
    slow = 0.04
    choose = METHODS[method].choose
    calls = []

    def slow_choose(self, *args, **kwargs):
        calls.append(1)
        time.sleep(slow)
        return choose(self, *args, **kwargs)

    monkeypatch.setattr(METHODS[method], "choose", slow_choose)
    with prunevlm.prune(model, method, 0.5) as handle:
        model(**inputs)
        stats = handle.stats
    assert calls
    assert stats.llm_choice_ms >= 1000 * slow * len(calls)
    assert stats.selection_ms >= stats.llm_choice_ms + stats.signal_ms
    assert "in the LLM" in str(stats)


def test_pre_llm_methods_spend_nothing_inside_the_llm():
    make, make_inputs, _ = FAMILIES["llava"]
    model, inputs = make(layers=4), make_inputs()
    with prunevlm.prune(model, "flashvlm", 0.5) as handle:
        model(**inputs)
        assert handle.stats.llm_choice_ms == 0 and handle.stats.selection_ms > 0


@torch.no_grad()
@pytest.mark.parametrize("method,family", CASES)
def test_batch_with_a_text_only_row_equals_rows_alone(method, family):
    """Logits within 1e-5 (the batch sums in other orders); the tokens exactly, which that tolerance decides
    since every step's top logit leads by more than 2e-5 (checked)."""
    make, make_inputs, kind = FAMILIES[family]
    model, inputs = make(layers=4), make_inputs()
    with prunevlm.prune(model, method, 0.5):
        batch = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        assert tiny.greedy_margin(batch.logits) > 2e-5
        seen = 0
        for row, count in enumerate([1, 0, 2]):
            single = tiny.row_inputs(inputs, row, seen, count, kind)
            seen += count
            alone = model.generate(**single, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
            assert torch.equal(alone.sequences[0, -4:], batch.sequences[row, -4:])
            for step_batch, step_alone in zip(batch.logits, alone.logits):
                torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-5, rtol=0)


def test_a_decoder_without_q_k_projections_is_refused():
    model = tiny.llava(layers=4)
    del get_adapter(model).decoder_layers()[0].self_attn.q_proj
    with pytest.raises(NotImplementedError, match="cannot be recomputed"):
        prunevlm.prune(model, "fastv", 0.5)
    prunevlm.prune(model, "dart", 0.5).remove()  # dart reads the cache's keys, not q/k


@torch.no_grad()
def test_choose_sees_text_without_any_images_tokens():
    """The `text` mask handed to `choose` is False on padding and on the visual tokens of every image of the
    row (a later image is no text after the earlier one)."""
    seen = []

    class Spy(FastV):
        def choose(self, stage, count, columns, real, text, last_attention):
            seen.append((columns, real, text))
            return super().choose(stage, count, columns, real, text, last_attention)

    model, inputs = tiny.llava(layers=4), tiny.llava_inputs([1, 0, 2])
    with prunevlm.prune(model, Spy(), 0.5):
        model(**inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    rows = [0, 2, 2]
    assert len(seen) == 3
    for row, (columns, real, text) in zip(rows, seen):
        assert torch.equal(real, mask[row])
        assert torch.equal(text, mask[row] & (ids[row] != tiny.LLAVA_IMAGE))
        assert (ids[row, columns] == tiny.LLAVA_IMAGE).all()
