"""LLaVA-NeXT and LLaVA-OneVision: packed AnyRes images (base crop, unpadded tile plane, row newlines), on
tiny random models built from configs, with images of different aspect ratios so tile counts differ."""

import pytest
import torch

import prunevlm
import tiny
from prunevlm.models import get_adapter
from prunevlm.models.base import Capture
from prunevlm.methods.uniform import plane_shares
from prunevlm.signals.attention import received_attention
from prunevlm.models.llava_next import COLUMN, CONTENT, CROP

FAMILIES = {"llava_next": tiny.llava_next, "llava_onevision": tiny.llava_onevision}
# row 0: a wide image (1 x 2 tiles); row 1: a large image (OneVision downscales its plane) and a square one;
# row 2: text only
SIZES = [[(30, 50)], [(100, 120), (40, 40)], []]
METHODS = ["flashvlm", "vispruner", "random", "uniform", "divprune", "cdpruner", "visionzip"]
GENERATE = dict(max_new_tokens=4, **tiny.GREEDY)


def row_alone(inputs: dict, row: int) -> dict:
    """The inputs of one row of SIZES, unpadded, with its own images."""
    return tiny.row_inputs(inputs, row, sum(len(sizes) for sizes in SIZES[:row]), len(SIZES[row]), "anyres")


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    model = FAMILIES[request.param]()
    return request.param, model, tiny.anyres_inputs(model, SIZES)


def test_layout_follows_the_model_s_own_packing():
    """The reference's worked example: 30 x 50 px with 32 px tiles of 4 x 4 tokens is a 1 x 2 tile grid,
    stitched into a 4 x 8 plane whose columns 1-6 survive unpadding; 16 base tokens, then 4 rows of
    6 tokens and a newline. Row 0 reads tile 1 columns 1-3, tile 2 columns 0-2, then the newline."""
    adapter = get_adapter(tiny.llava_next())
    (layout,) = adapter.layout(torch.tensor([[30, 50]]))
    assert layout.shape[0] == 44 and layout[:16, CROP].eq(0).all()
    assert layout[16:23, CROP].tolist() == [1, 1, 1, 2, 2, 2, 0]
    assert layout[16:22, COLUMN].tolist() == [1, 2, 3, 0, 1, 2]
    assert torch.nonzero(layout[:, CONTENT] == 0).flatten().tolist() == [22, 29, 36, 43]
    rows = adapter.newline_rows(layout)
    assert rows[:16].eq(-1).all() and rows[16:23].eq(0).all() and rows[37:44].eq(3).all()


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_a_budget_above_every_image_is_the_identity_and_remove_restores(case, method):
    """A budget above every image gives the logits and tokens of the unhooked model, and remove() restores them.
    Exact: the same computation on the same inputs, in one process (the hooks must change nothing the model
    computes there), not two computation paths."""
    _, model, inputs = case
    reference = model(**inputs).logits
    ids = model.generate(**inputs, **GENERATE)
    with prunevlm.prune(model, method, 10_000) as handle:
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, **GENERATE), ids)
    assert handle.stats.tokens_after == handle.stats.tokens_before
    assert torch.equal(model(**inputs).logits, reference)


@torch.no_grad()
@pytest.mark.parametrize("budget", [8, 0.25])
def test_prefill_is_text_plus_the_budget_of_each_image_and_no_newline_competes(case, budget):
    _, model, inputs = case
    adapter = get_adapter(model)
    layouts = adapter.layout(inputs["image_sizes"])
    counts = [int(layout.shape[0]) for layout in layouts]
    placeholders = [counts[:1], counts[1:3], []]
    with prunevlm.prune(model, "flashvlm", budget) as handle:
        model(**inputs)
    stats = handle.stats
    assert stats.tokens_before == placeholders
    expected = [[prunevlm.Budget(budget).tokens_to_keep(n) for n in row] for row in placeholders]
    assert stats.tokens_after == expected
    text = (inputs["attention_mask"].sum(dim=1) - torch.tensor([sum(row) for row in placeholders])).tolist()
    assert stats.prefill_after == [t + sum(row) for t, row in zip(text, expected)]
    for kept, layout in zip([k for row in stats.kept for k in row], layouts):
        assert layout[kept, CONTENT].eq(1).all()  # newlines are dropped, never chosen


@torch.no_grad()
def test_newline_policies(case):
    _, model, inputs = case
    adapter = get_adapter(model)
    layouts = adapter.layout(inputs["image_sizes"])
    kept = {}
    for policy in ("drop", "keep_nonempty_rows", "keep_all"):
        with prunevlm.prune(model, "vispruner", 6, newline=policy) as handle:
            model(**inputs)
        kept[policy] = [k for row in handle.stats.kept for k in row]
    for i, layout in enumerate(layouts):
        newlines = torch.nonzero(layout[:, CONTENT] == 0).flatten()
        content = kept["drop"][i]
        assert torch.equal(kept["keep_all"][i], torch.cat([content, newlines]).sort().values)
        rows = adapter.newline_rows(layout)
        nonempty = newlines[torch.isin(rows[newlines], rows[content])]
        assert torch.equal(kept["keep_nonempty_rows"][i], torch.cat([content, nonempty]).sort().values)
    with pytest.raises(ValueError, match="newline must be one of 'drop', 'keep_nonempty_rows', 'keep_all'"):
        prunevlm.prune(model, "vispruner", 6, newline="keep")


@torch.no_grad()
@pytest.mark.parametrize("method", ["flashvlm", "divprune", "visionzip"])
def test_left_padded_batch_with_a_text_only_row_equals_the_rows_alone(case, method):
    _, model, inputs = case
    with prunevlm.prune(model, method, 5):
        tiny.assert_batch_equals_rows(model, inputs, [row_alone(inputs, row) for row in range(len(SIZES))], **GENERATE)


@torch.no_grad()
def test_sampling_and_beam_search_run_pruned(case):
    _, model, inputs = case
    with prunevlm.prune(model, "flashvlm", 6) as handle:
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=20)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, **tiny.GREEDY)
    assert sampled.shape[0] == 3 and beams.shape[0] == 6
    assert handle.stats.tokens_after == [[6], [6], [6, 6], [6, 6], [], []]  # each row twice, 6 per image


@torch.no_grad()
def test_uniform_spreads_each_plane_s_share_over_it(case):
    """The base crop (4 x 4) and the tile plane share k by size; each share lies evenly on its own plane."""
    _, model, inputs = case
    adapter = get_adapter(model)
    with prunevlm.prune(model, "uniform", 10) as handle:
        model(**inputs)
    for kept, layout in zip([k for row in handle.stats.kept for k in row], adapter.layout(inputs["image_sizes"])):
        (_, base_cols), (rows, cols) = adapter.planes(layout)
        base, grid = kept[kept < 16], kept[kept >= 16]
        assert base.numel() == plane_shares(10, [16, rows * cols])[0] and kept.numel() == 10
        assert layout[kept, CONTENT].eq(1).all() and layout[grid, CROP].ge(1).all()


def test_plane_shares_are_proportional_with_largest_remainders():
    assert plane_shares(10, [16, 24]) == [4, 6]
    assert plane_shares(8, [16, 24]) == [3, 5]  # 3.2 and 4.8: the larger remainder gets the extra token
    assert plane_shares(5, [16, 16]) == [3, 2]  # a tie goes to the earlier plane
    assert plane_shares(17, [16, 1]) == [16, 1]


@torch.no_grad()
def test_onevision_saliency_is_the_attention_each_token_receives():
    """The hook's received attention equals the eager tower's attention map averaged over heads and queries
    (SigLIP has no CLS token), packed like the features."""
    model = tiny.llava_onevision()
    inputs = tiny.anyres_inputs(model, [[(40, 40)]])
    adapter = get_adapter(model)
    capture = Capture()
    handles = adapter.install({"saliency"}, capture)
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    (saliency,) = capture.calls[-1]["saliency"]
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    crops = inputs["pixel_values"][0, : adapter.crops(inputs["image_sizes"])[0]]
    attention = tower(crops, output_attentions=True).attentions[adapter.feature_layer]
    tower.config._attn_implementation = "sdpa"
    received = attention.mean(dim=1).mean(dim=1)  # [crops, T]
    (expected,) = adapter.pack(received[..., None], inputs["image_sizes"])
    torch.testing.assert_close(saliency, expected[:, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 600, 8), (2, 3, 20, 8)], ids=["query blocks", "several heads a block"])
def test_received_attention_is_the_column_sum_of_the_head_averaged_map(shape):
    """Blockwise (600 x 600 logits are split into blocks of query rows; 20 x 20 ones are taken several heads
    at once), batch dimensions kept: the column sums of the explicit map, to float rounding."""
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    explicit = torch.softmax(queries @ keys.transpose(-1, -2) * 0.3, dim=-1).mean(dim=-3).sum(dim=-2)
    torch.testing.assert_close(received_attention(queries, keys, 0.3), explicit, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_onevision_images_of_a_multi_image_prompt_are_one_base_crop_each():
    model = tiny.llava_onevision()
    adapter = get_adapter(model)
    sizes = torch.tensor([[30, 50], [100, 120]])
    counts = adapter.image_token_counts({"pixel_values": torch.zeros(1), "image_sizes": sizes, "batch_num_images": [2]})
    assert counts == [17, 17]  # 16 base tokens and one newline


IN_LLM = ["fastv", "pdrop", "dart", "sparsevlm"]


@torch.no_grad()
@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_baselines_run_on_packed_images_and_restore(case, method):
    """The in-LLM baselines on NeXT/OneVision: a full budget is the identity; a reachable layer average
    prunes inside the LLM (stages reported), and remove() restores the model. Six LLM layers: PyramidDrop
    and SparseVLM need more than their three stages. The identity is compared exactly: the same computation
    on the same inputs, in one process."""
    name, _, inputs = case
    model = FAMILIES[name](layers=6)
    reference = model(**inputs).logits
    with prunevlm.prune(model, method, 1.0):
        assert torch.equal(model(**inputs).logits, reference)
    with prunevlm.prune(model, method, 0.9) as handle:
        model.generate(**inputs, **GENERATE)
    assert all(plan.layers for row in handle.stats.stages for plan in row)
    assert torch.equal(model(**inputs).logits, reference)


# images none of which OneVision downscales: a wide one (1 x 2 tiles), a tall one (2 x 1), a square one
UNSCALED = [[(30, 50)], [(50, 30), (40, 40)], []]


def crop_sizes(layout: torch.Tensor) -> dict[int, int]:
    """Candidates (content placeholders) per crop of a packed image."""
    crops = layout[layout[:, CONTENT] > 0.5, CROP].long()
    return {int(c): int((crops == c).sum()) for c in crops.unique()}


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["flashvlm", "uniform", "visionzip", "divprune"])
@pytest.mark.parametrize("budget", [3, 0.3])
def test_per_crop_budgets_keep_exactly_each_crop_s_count(family, method, budget):
    """budget_scope="per_crop": every crop keeps the budget counted on its own unpadded candidates (a fraction
    rounded per crop), the image's budget is their sum, and the prefill is text plus those sums."""
    model = FAMILIES[family]()
    inputs = tiny.anyres_inputs(model, UNSCALED)
    layouts = get_adapter(model).layout(inputs["image_sizes"])
    with prunevlm.prune(model, method, budget, budget_scope="per_crop") as handle:
        model(**inputs)
    stats = handle.stats
    per_crop = [{c: prunevlm.Budget(budget).tokens_to_keep(n) for c, n in crop_sizes(layout).items()} for layout in layouts]
    expected = [[sum(per_crop[0].values())], [sum(per_crop[1].values()), sum(per_crop[2].values())], []]
    assert stats.budget_scope == "per_crop" and stats.budget_tokens == expected and stats.tokens_after == expected
    text = (inputs["attention_mask"].sum(dim=1) - torch.tensor([sum(row) for row in stats.tokens_before])).tolist()
    assert stats.prefill_after == [t + sum(row) for t, row in zip(text, expected)]
    for kept, layout, counts in zip([k for row in stats.kept for k in row], layouts, per_crop):
        assert layout[kept, CONTENT].eq(1).all()
        crops = layout[kept, CROP].long()
        assert {c: int((crops == c).sum()) for c in counts} == counts


@torch.no_grad()
def test_per_crop_keeps_newlines_by_policy_and_a_full_budget_is_the_identity(case):
    """Per-crop budgets keep the newline tokens by policy, and a full budget is the identity. Exact: the same
    computation on the same inputs, in one process (the hooks must change nothing the model computes there), not
    two computation paths."""
    _, model, _ = case
    inputs = tiny.anyres_inputs(model, UNSCALED)
    layouts = get_adapter(model).layout(inputs["image_sizes"])
    reference = model(**inputs).logits
    with prunevlm.prune(model, "flashvlm", 10_000, budget_scope="per_crop") as handle:
        assert torch.equal(model(**inputs).logits, reference)
    assert handle.stats.tokens_after == handle.stats.tokens_before == handle.stats.budget_tokens
    with prunevlm.prune(model, "flashvlm", 2, budget_scope="per_crop", newline="keep_all") as handle:
        model(**inputs)
    newlines = [int((layout[:, CONTENT] < 0.5).sum()) for layout in layouts]
    after = [n for row in handle.stats.tokens_after for n in row]
    granted = [n for row in handle.stats.budget_tokens for n in row]
    assert after == [g + n for g, n in zip(granted, newlines)]


@torch.no_grad()
def test_per_crop_refusals_say_what_to_do():
    model = tiny.llava_onevision()
    with prunevlm.prune(model, "flashvlm", 4, budget_scope="per_crop"):  # (100, 120) is downscaled
        with pytest.raises(ValueError, match="mix neighbouring crops.*use budget_scope='per_image'"):
            model(**tiny.anyres_inputs(model, [[(100, 120)]]))
    with pytest.raises(ValueError, match="fastv prunes inside the LLM.*budget_scope='per_image'"):
        prunevlm.prune(model, "fastv", 0.5, budget_scope="per_crop")
    with pytest.raises(ValueError, match="budget_scope must be 'per_image' .* or 'per_crop' .*, got 'crop'"):
        prunevlm.prune(model, "flashvlm", 4, budget_scope="crop")


@torch.no_grad()
@pytest.mark.parametrize("budget", [5, 0.2])
def test_per_crop_is_per_image_for_a_family_with_one_crop(budget):
    """With one crop per image the two scopes run the same computation, so the kept tokens are compared
    exactly."""
    model = tiny.llava()
    inputs = tiny.llava_inputs([1, 2])
    kept = {}
    for scope in ("per_image", "per_crop"):
        with prunevlm.prune(model, "flashvlm", budget, budget_scope=scope) as handle:
            model(**inputs)
        kept[scope] = handle.stats
    assert kept["per_crop"].tokens_after == kept["per_image"].tokens_after == kept["per_crop"].budget_tokens
    for a, b in zip(kept["per_crop"].kept, kept["per_image"].kept):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
