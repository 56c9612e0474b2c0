"""No silent divergence (#26): a returned cache continued, a padded plain forward, image ids without images, a
Qwen2.5-VL tower whose full-attention indexes lie past its depth, a second handle or a deep copy, threads."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

import prunevlm
import tiny
from prunevlm.methods.base import SignalsUnavailable
from prunevlm.runtime.contract import cache_keyword, output_cache

FAMILIES = {"llava": tiny.llava, "qwen2_vl": tiny.qwen2_vl, "qwen2_5_vl": tiny.qwen2_5_vl, "qwen3_vl": tiny.qwen3_vl}
LAYOUTS = {"single": [1], "batch": [1, 0, 2]}  # images per row
QWEN_GRIDS = [(4, 8), (4, 4), (4, 8)]  # patch grids of the images, in order
OPTIONS = dict(tiny.GREEDY, return_dict_in_generate=True, output_scores=True)


def make_inputs(family: str, images_per_row: list[int]) -> dict:
    if family == "llava":
        return tiny.llava_inputs(images_per_row)
    grids = iter(QWEN_GRIDS)
    return tiny.qwen_inputs([[next(grids) for _ in range(count)] for count in images_per_row])


def pad_every_row(inputs: dict, columns: int = 1) -> dict:
    """The inputs with `columns` more pad columns on the left of every row (as a processor padding to a multiple
    does), so that no row is free of padding."""
    padded = dict(inputs)
    padded["input_ids"] = F.pad(inputs["input_ids"], (columns, 0), value=tiny.PAD)
    padded["attention_mask"] = F.pad(inputs["attention_mask"], (columns, 0), value=0)
    if "mm_token_type_ids" in inputs:
        padded["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (columns, 0), value=0)
    return padded


def assert_same_generation(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


# -- 1. continuing a returned cache ---------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("budget", [1.0, 0.5])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_continues_a_returned_cache_as_one_call(family, layout, budget):
    """transformers' test_generate_continue_from_past_key_values: 4 tokens in one call equal 3, then 1 from the
    returned cache and the whole sequence (generate() feeds the tokens after the pruned cache's length, which
    the handle must recognise). A single row's all-ones mask is dropped by generate(); the batch keeps its."""
    name, model = family
    inputs = make_inputs(name, LAYOUTS[layout])
    with prunevlm.prune(model, "flashvlm", budget):
        whole = model.generate(**inputs, max_new_tokens=4, **OPTIONS)
        first = model.generate(**inputs, max_new_tokens=3, **OPTIONS)
        mask = F.pad(inputs["attention_mask"], (0, first.sequences.shape[1] - inputs["input_ids"].shape[1]), value=1)
        second = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=1, **OPTIONS,
                                **{cache_keyword(model): output_cache(first)})
    second.scores = first.scores + second.scores
    assert_same_generation(whole, second)


@torch.no_grad()
@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_a_new_turn_on_a_returned_cache_equals_the_conversation_prefilled_at_once(family, budget):
    """A second chat turn (several new tokens at once) on the kept cache: with a selection that does not depend
    on the text (uniform), prefilling the whole conversation prunes the same tokens, so both must agree."""
    name, model = family
    inputs = make_inputs(name, LAYOUTS["batch"])
    with prunevlm.prune(model, "uniform", budget):
        first = model.generate(**inputs, max_new_tokens=3, **OPTIONS)
        turn = torch.randint(3, 290, (first.sequences.shape[0], 4), generator=torch.Generator().manual_seed(1))
        ids = torch.cat([first.sequences, turn], dim=1)
        mask = F.pad(inputs["attention_mask"], (0, ids.shape[1] - inputs["input_ids"].shape[1]), value=1)
        continued = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **OPTIONS,
                                   **{cache_keyword(model): output_cache(first)})
        conversation = {**inputs, "input_ids": ids, "attention_mask": mask}
        if "mm_token_type_ids" in inputs:
            conversation["mm_token_type_ids"] = (ids == tiny.QWEN_IMAGE).int()
        at_once = model.generate(**conversation, max_new_tokens=3, **OPTIONS)
    assert torch.equal(continued.sequences, at_once.sequences)
    for x, y in zip(continued.scores, at_once.scores):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


@torch.no_grad()
def test_a_decoding_step_that_does_not_continue_the_pruned_prompt_is_refused(family):
    """A mask claiming more new tokens than were fed, and positions counted from the pruned cache's length (a
    hand-written loop's mistake), are refused instead of run."""
    name, model = family
    inputs = make_inputs(name, LAYOUTS["batch"])
    with prunevlm.prune(model, "flashvlm", 0.5):
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        step = out.logits[:, -1:].argmax(dim=-1)
        extra = {"mm_token_type_ids": torch.zeros_like(step)} if name != "llava" else {}
        extra[cache_keyword(model)] = cache
        two_more = F.pad(inputs["attention_mask"], (0, 2), value=1)
        with pytest.raises(ValueError, match="got 1 input token.*attention mask of"):
            model(input_ids=step, attention_mask=two_more, use_cache=True, **extra)
        one_more = F.pad(inputs["attention_mask"], (0, 1), value=1)
        wrong = torch.full_like(step, cache.get_seq_length())
        with pytest.raises(ValueError, match="position ids .* but the prompt implies"):
            model(input_ids=step, attention_mask=one_more, position_ids=wrong, use_cache=True, **extra)


# -- 2. a plain forward of a padded batch --------------------------------------------------------------------


@torch.no_grad()
def test_full_budget_is_the_identity_for_a_padded_plain_forward(family):
    """No image loses a token: the call reaches the language model unchanged (pad columns and placeholders
    under mask 0 included), so logits keep the input's shape and values, and the stats say nothing moved."""
    name, model = family
    inputs = pad_every_row(make_inputs(name, LAYOUTS["batch"]))
    reference = model(**inputs).logits
    with prunevlm.prune(model, "flashvlm", 1.0) as handle:
        logits = model(**inputs).logits
    assert torch.equal(logits, reference)
    assert logits[inputs["attention_mask"].bool()].shape[0] == int(inputs["attention_mask"].sum())
    assert handle.stats.prefill_after == handle.stats.prefill_before
    assert handle.stats.tokens_after == handle.stats.tokens_before
    assert torch.equal(handle.stats.input_columns, torch.arange(logits.shape[1]).expand(logits.shape[0], -1))


@torch.no_grad()
def test_a_pruned_forward_says_which_input_column_each_logit_belongs_to(family):
    """At a real budget the returned sequence is shorter and re-padded; `stats.input_columns` maps each of its
    positions to the input column it holds. Aligned that way, a padded batch's logits equal each row's alone."""
    name, model = family
    images_per_row = LAYOUTS["batch"]
    inputs = pad_every_row(make_inputs(name, images_per_row))
    firsts = [sum(images_per_row[:row]) for row in range(len(images_per_row))]
    with prunevlm.prune(model, "flashvlm", 0.5) as handle:
        logits = model(**inputs).logits
        columns = handle.stats.input_columns
        assert columns.shape == logits.shape[:2]
        for row, (first, count) in enumerate(zip(firsts, images_per_row)):
            single = tiny.row_inputs(inputs, row, first, count, "llava" if name == "llava" else "qwen")
            alone = model(**single).logits[0]
            pad = int((inputs["attention_mask"][row] == 0).sum())
            in_batch = {int(c) - pad: j for j, c in enumerate(columns[row].tolist()) if c >= 0}
            by_itself = {int(c): j for j, c in enumerate(handle.stats.input_columns[0].tolist())}
            assert in_batch.keys() == by_itself.keys()
            text = torch.nonzero(single["input_ids"][0] != model.config.image_token_id).flatten().tolist()
            assert set(text) <= in_batch.keys()
            for column, j in in_batch.items():
                torch.testing.assert_close(logits[row, j], alone[by_itself[column]], rtol=0, atol=1e-5)


# -- 5. image ids in a call without images ------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_image_token_ids_without_images_are_left_alone(family, budget):
    """The mixins' random inputs: image token ids in the text, no image. A stock model embeds them as text;
    with nothing to prune, the handle stays out of the way."""
    name, model = family
    full = make_inputs(name, LAYOUTS["batch"])
    inputs = {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]}
    assert (inputs["input_ids"] == model.config.image_token_id).any()
    reference, ids = model(**inputs).logits, model.generate(**inputs, max_new_tokens=3, **tiny.GREEDY)
    with prunevlm.prune(model, "flashvlm", budget) as handle:
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, **tiny.GREEDY), ids)
    assert handle.stats.tokens_before == [[], [], []]


# -- 4. Qwen2.5-VL full-attention indexes past the tower's depth ---------------------------------------------


@torch.no_grad()
def test_qwen2_5_vl_full_attention_indexes_past_the_depth_are_read_as_transformers_reads_them():
    """transformers' own tiny config: depth 2, fullatt_block_indexes 7/15/23/31. transformers skips indexes
    past the depth (every block windowed), so no attention signal exists: such methods are refused at prune()
    with the reason; methods without attention signals prune as usual."""
    model = tiny.qwen2_5_vl(depth=2, fullatt_block_indexes=(7, 15, 23, 31))
    inputs = tiny.qwen_inputs([[(4, 8)]])
    with pytest.raises(SignalsUnavailable, match=r"windows every block: fullatt_block_indexes \[7, 15, 23, 31\]"):
        prunevlm.prune(model, "flashvlm", 0.5)
    assert not hasattr(model.model, "_prunevlm_handle")
    with prunevlm.prune(model, "uniform", 0.5) as handle:
        model.generate(**inputs, max_new_tokens=2, **tiny.GREEDY)
    assert handle.stats.tokens_after == [[4]]


# -- 7. a second handle, a deep copy ------------------------------------------------------------------------


@torch.no_grad()
def test_a_second_handle_through_the_wrapped_model_is_refused():
    model = tiny.llava()
    with prunevlm.prune(model, "flashvlm", 4):
        with pytest.raises(RuntimeError, match="already attached"):
            prunevlm.prune(model.model, "flashvlm", 4)
    with prunevlm.prune(model.model, "flashvlm", 4):
        with pytest.raises(RuntimeError, match="already attached"):
            prunevlm.prune(model, "flashvlm", 4)
    prunevlm.prune(model, "flashvlm", 4).remove()  # each refusal left nothing attached


@torch.no_grad()
def test_a_deep_copy_under_a_handle_is_refused_and_works_after_remove():
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    with prunevlm.prune(model, "flashvlm", 4) as handle:
        expected = model(**inputs).logits
        with pytest.raises(TypeError, match="cannot be deep-copied.*handle.remove\\(\\)"):
            copy.deepcopy(model)
    copied = copy.deepcopy(model)
    with prunevlm.prune(copied, "flashvlm", 4):
        torch.testing.assert_close(copied(**inputs).logits, expected, rtol=0, atol=0)
    assert handle.stats.tokens_after == [[4]]


# -- 8. one handle, several threads ------------------------------------------------------------------------


@torch.no_grad()
def test_one_handle_serves_generate_from_two_threads():
    """Two threads generate at once on one handle: each gets what it gets alone, and its own stats. Each thread
    waits (at most 1 s, once) for the other at two points: the vision tower, which generate() runs before the
    model's forward (so both record signals at once), and the language model, inside the forward (where,
    without the handle's one-forward-at-a-time lock, the other prefill's images would reach this one's hook)."""
    model = tiny.llava()
    prompts = [tiny.llava_inputs([1], seed=1), tiny.llava_inputs([2], seed=2)]
    options = dict(max_new_tokens=4, **tiny.GREEDY)
    with prunevlm.prune(model, "flashvlm", 3) as handle:
        alone = [model.generate(**inputs, **options) for inputs in prompts]
        names = {}

        def meeting_point():
            arrived = [threading.Event(), threading.Event()]

            def meet(*_):
                me = names.get(threading.get_ident())
                if me is not None and not arrived[me].is_set():
                    arrived[me].set()
                    arrived[1 - me].wait(timeout=1)

            return meet

        meetings = [model.model.vision_tower.register_forward_pre_hook(meeting_point()),
                    model.model.language_model.register_forward_pre_hook(meeting_point(), prepend=True)]
        results, stats, errors = [None, None], [None, None], []

        def run(index):
            names[threading.get_ident()] = index
            try:
                with torch.no_grad():
                    results[index] = model.generate(**prompts[index], **options)
                stats[index] = handle.stats.tokens_before
            except Exception as error:  # re-raised below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for meeting in meetings:
            meeting.remove()
    if errors:
        raise errors[0]
    assert all(torch.equal(result, expected) for result, expected in zip(results, alone))
    assert stats == [[[16]], [[16, 16]]]
