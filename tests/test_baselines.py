"""The pre-LLM baselines divprune, visionzip and cdpruner: the worked checks of docs/baselines.md, reference
implementations written plainly, property tests (hypothesis), and runs on the tiny models."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import prunevlm
import tiny
from prunevlm.methods import METHODS
from prunevlm.methods.cdpruner import OFFSET, conditional_kernel, greedy_map, relevance, streamed_greedy_map
from prunevlm.methods.divprune import cosine_distances, max_min_order, streamed_max_min_order
from prunevlm.methods.portable import cosines, unit_rows
from prunevlm.methods.visionzip import contextual_count, target_positions
from prunevlm.runtime.contract import output_cache

BASELINES = ["divprune", "visionzip", "cdpruner"]


def random_signals(batch, tokens, dim=16, text=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "image_tokens": torch.randn(batch, tokens, dim, generator=g, dtype=dtype),
        "saliency": torch.rand(batch, tokens, generator=g, dtype=dtype),
        "keys": torch.randn(batch, tokens, 8, generator=g, dtype=dtype),
        "text_embeds": torch.randn(batch, text, dim, generator=g, dtype=dtype),
    }


def signals_for(method, s):
    cls = METHODS[method]
    return {name: value for name, value in s.items() if name in cls.signals + cls.optional_signals}


# -- DivPrune ---------------------------------------------------------------------------------------------


def plain_max_min(tokens, k, exclude_chosen=True):
    """The greedy written plainly, O(k N²): every step recomputes each token's minimum distance to the chosen
    set. The first pick is the token with the largest second-smallest entry of its distance column (the
    smallest being its own). With exclude_chosen=False it is the official rule, which may pick a token again.
    Cosines in fp64 rounded to fp32, the rule of docs/diversity.md ("Same result on every CPU")."""
    unit = F.normalize(tokens.double(), dim=-1)
    distances = 1 - (unit @ unit.T).float()
    chosen = [int(distances.sort(dim=0).values[1].argmax())]
    for _ in range(1, k):
        best, best_value = None, -math.inf
        for j in range(tokens.shape[0]):
            if exclude_chosen and j in chosen:
                continue
            value = min(float(distances[i, j]) for i in chosen)
            if value > best_value:
                best, best_value = j, value
        chosen.append(best)
    return chosen


def max_min_ties(tokens, k) -> bool:
    """Whether the greedy of `plain_max_min` meets an exact tie in the fp32 distances it compares at any of its
    k picks. There the lowest index wins (docs/diversity.md), so the kept set depends on where the tokens sit."""
    unit = F.normalize(tokens.double(), dim=-1)
    distances = 1 - (unit @ unit.T).float()
    scores = distances.sort(dim=0).values[1]  # the first pick's
    chosen = []
    for _ in range(k):
        if len(chosen) + 1 < tokens.shape[0]:
            top = scores.topk(2).values
            if top[0] == top[1]:
                return True
        chosen.append(int(scores.argmax()))
        scores = distances[chosen[-1]] if len(chosen) == 1 else torch.minimum(scores, distances[chosen[-1]])
        scores = scores.clone()
        scores[chosen] = -math.inf
    return False


def test_divprune_picks_angles_in_the_documented_order():
    """docs/baselines.md, DivPrune check 1: angles {0, 10, 20, 95, 170, 180} degrees, k = 3 -> 95, 0, 180."""
    angles = torch.tensor([0.0, 10, 20, 95, 170, 180], dtype=torch.float64).deg2rad()
    tokens = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    selection = prunevlm.select("divprune", 3, image_tokens=tokens)
    assert selection.info["order"][0].tolist() == [3, 0, 5]
    assert selection.keep[0].tolist() == [0, 3, 5]


def test_divprune_never_repeats_a_duplicated_token():
    """Check 2: 10 copies of e1, 10 of e2, one e3, k = 5. The official rule repeats e1#0; the library gives 5
    distinct tokens and agrees with it on the first 3 picks."""
    basis = torch.eye(3)
    tokens = torch.cat([basis[0].expand(10, 3), basis[1].expand(10, 3), basis[2:]])
    official = plain_max_min(tokens, 5, exclude_chosen=False)
    assert official[:3] == [20, 0, 10] and len(set(official)) < 5
    order = prunevlm.select("divprune", 5, image_tokens=tokens[None]).info["order"][0].tolist()
    assert order[:3] == official[:3] and len(set(order)) == 5


@pytest.mark.parametrize("batch,tokens,dim,k", [(1, 6, 2, 3), (2, 50, 8, 10), (3, 120, 32, 40), (1, 64, 4, 63)])
def test_divprune_equals_the_plain_greedy(batch, tokens, dim, k):
    """Index for index: both apply the rule of docs/diversity.md (fp64 cosines rounded to fp32, ties to the
    lowest index), so they compare the same fp32 distances on any CPU."""
    s = random_signals(batch, tokens, dim, seed=tokens + k)
    selection = prunevlm.select("divprune", k, image_tokens=s["image_tokens"])
    for row in range(batch):
        assert selection.info["order"][row].tolist() == plain_max_min(s["image_tokens"][row], k)


def test_divprune_fp16_tokens_give_distinct_tokens_as_fp32():
    """Distances are computed from fp64 cosines rounded to fp32 for fp16 tokens too, so duplicates never come
    back; the fp16 values are exact in fp32, so both runs compute the same numbers."""
    tokens = torch.randn(1, 8, 16).half()[:, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 7])]
    keep = prunevlm.select("divprune", 12, image_tokens=tokens).keep[0]
    assert keep.unique().numel() == 12
    assert torch.equal(keep, prunevlm.select("divprune", 12, image_tokens=tokens.float()).keep[0])


def test_divprune_ignores_the_scale_of_each_token():
    """Check 3, second half: a positive scale per token changes nothing (powers of two: the unit vectors are
    bit-identical, so the same numbers are computed on any CPU)."""
    s = random_signals(2, 80, 12, seed=3)
    scales = 2.0 ** torch.randint(-4, 5, (2, 80, 1)).double()
    plain = prunevlm.select("divprune", 20, image_tokens=s["image_tokens"])
    scaled = prunevlm.select("divprune", 20, image_tokens=s["image_tokens"] * scales)
    assert torch.equal(plain.info["order"], scaled.info["order"])


# -- CDPruner ---------------------------------------------------------------------------------------------


def naive_log_det_greedy(kernel, k):
    """Greedy log-det maximisation written plainly: each step tries every token (docs/baselines.md, CDPruner
    check 1)."""
    chosen = []
    for _ in range(k):
        best, best_value = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            index = chosen + [j]
            sign, value = torch.linalg.slogdet(kernel[index][:, index])
            if sign > 0 and value > best_value:
                best, best_value = j, float(value)
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sign", [1, -1])
def test_cdpruner_fast_greedy_equals_the_log_det_greedy(seed, sign):
    """Check 1: the same picks as naive greedy log-det maximisation, and log det L_S = Σ log gains (within
    the default fp64 tolerance). The picks are compared exactly: the two compare different numbers (fp32
    residuals, fp64 log-determinants), which agree on every CPU since no two gains of these seeds lie within
    an fp32 rounding of each other."""
    s = random_signals(2, 40, 24, seed=seed)
    selection = prunevlm.select("cdpruner", 15, relevance_sign=sign, image_tokens=s["image_tokens"],
                                text_embeds=s["text_embeds"])
    kernel = conditional_kernel(s["image_tokens"], relevance(s["image_tokens"], s["text_embeds"], sign=float(sign)))
    for row in range(2):
        order = selection.info["order"][row].tolist()
        assert order == naive_log_det_greedy(kernel[row], 15)
        log_det = torch.linalg.slogdet(kernel[row][order][:, order]).logabsdet
        torch.testing.assert_close(selection.info["gains"][row].log().sum(), log_det)


def test_cdpruner_orthonormal_tokens_are_chosen_by_relevance():
    """Check 2: with S = I the selection is the top k by r."""
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    tokens = (q * torch.rand(32, 1, dtype=torch.float64))[None]  # scaled rows: still S = I
    text = torch.randn(1, 4, 32, dtype=torch.float64)
    selection = prunevlm.select("cdpruner", 10, image_tokens=tokens, text_embeds=text)
    r = relevance(tokens, text)
    assert selection.info["order"][0].tolist() == r[0].argsort(descending=True)[:10].tolist()


@pytest.mark.parametrize("sign", [1, -1])
def test_cdpruner_first_pick_is_the_most_relevant(sign):
    """Check 3: the first pick is argmax r; with the official sign, the token least similar to the text."""
    s = random_signals(1, 60, 16, seed=2)
    unit_image, unit_text = F.normalize(s["image_tokens"], dim=-1), F.normalize(s["text_embeds"], dim=-1)
    mean_cos = (unit_image @ unit_text.transpose(1, 2)).mean(dim=-1)[0]
    first = prunevlm.select("cdpruner", 5, relevance_sign=sign, **signals_for("cdpruner", s)).info["order"][0, 0]
    assert int(first) == int((sign * mean_cos).argmax())


def test_cdpruner_keeps_one_of_each_duplicate_while_rank_is_left():
    """Check 4: without text (constant r) it is a cosine DPP: of exact duplicates at most one is picked while
    the kernel has rank left; after the rank (6 distinct tokens) is used up the gains are 0 and no pick is
    NaN or repeated."""
    distinct = torch.randn(6, 16)
    tokens = distinct[torch.tensor([0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5])][None]
    selection = prunevlm.select("cdpruner", 9, image_tokens=tokens)
    order = selection.info["order"][0]
    groups = torch.tensor([0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5])[order]
    assert sorted(groups[:6].tolist()) == list(range(6))
    assert (selection.info["gains"][0, :6] > 0).all() and (selection.info["gains"][0, 6:] == 0).all()
    assert order.unique().numel() == 9


def test_cdpruner_rank_deficient_kernel_is_guarded():
    """d² <= 0: 30 tokens in 4 dimensions, k = 10. After 4 picks the rank is used up: the rest go by L_ii
    (relevance), highest first, with gain 0, and nothing is NaN."""
    s = random_signals(1, 30, 4, seed=1, dtype=torch.float32)
    selection = prunevlm.select("cdpruner", 10, **signals_for("cdpruner", s))
    order, gains = selection.info["order"][0], selection.info["gains"][0]
    assert torch.isfinite(gains).all() and (gains[:4] > 0).all() and (gains[4:] == 0).all()
    r = selection.scores[0]
    rest = [j for j in r.argsort(descending=True, stable=True).tolist() if j not in order[:4].tolist()]
    assert order[4:].tolist() == rest[:6]


def test_cdpruner_relevance_is_the_official_normalisation_rescaled():
    """Check 5: the official r = (ρ − min ρ + 1e-6) / (max ρ − min ρ) has min 1e-6 / span and max 1 + 1e-6 /
    span; relevance() is r / max r, and a kernel from the official r picks the same tokens. relevance() rounds ρ
    to fp32 (docs/diversity.md, "Same result on every CPU"), so r is compared with the fp64 formula within
    fp32 tolerance; the picks, which scaling the kernel leaves unchanged in exact arithmetic, are compared
    exactly: no two gains of this seed lie within an fp32 rounding of each other."""
    s = random_signals(2, 50, 16, seed=4)
    unit_image, unit_text = F.normalize(s["image_tokens"], dim=-1), F.normalize(s["text_embeds"], dim=-1)
    rho = (unit_image @ unit_text.transpose(1, 2)).mean(dim=-1)
    span = rho.amax(dim=1, keepdim=True) - rho.amin(dim=1, keepdim=True)
    official = (rho - rho.amin(dim=1, keepdim=True) + OFFSET) / span
    torch.testing.assert_close(official.amin(dim=1, keepdim=True), OFFSET / span)
    torch.testing.assert_close(official.amax(dim=1, keepdim=True), 1 + OFFSET / span)
    r = relevance(s["image_tokens"], s["text_embeds"])
    torch.testing.assert_close(r, (official / (1 + OFFSET / span)).float())
    ours, _ = greedy_map(conditional_kernel(s["image_tokens"], r), 12)
    theirs, _ = greedy_map(conditional_kernel(s["image_tokens"], official), 12)
    assert torch.equal(ours, theirs)


def test_cdpruner_constant_relevance_is_finite():
    """max ρ = min ρ (text orthogonal to every token) divides by zero in the official code; here r ≡ 1."""
    tokens = torch.cat([torch.randn(1, 20, 8), torch.zeros(1, 20, 4)], dim=-1)
    text = torch.cat([torch.zeros(1, 3, 8), torch.randn(1, 3, 4)], dim=-1)
    assert torch.equal(relevance(tokens, text), torch.ones(1, 20))
    without_text = prunevlm.select("cdpruner", 6, image_tokens=tokens)
    assert torch.equal(prunevlm.select("cdpruner", 6, image_tokens=tokens, text_embeds=text).keep, without_text.keep)


def test_cdpruner_ignores_padded_text_rows():
    """A padded row alone and in a batch: the batched products sum in other orders, which the rounding of ρ
    and of the cosines to fp32 absorbs (docs/diversity.md), so the picks are compared exactly."""
    s = random_signals(2, 40, 16, text=6, seed=7)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    batch = prunevlm.select("cdpruner", 8, image_tokens=s["image_tokens"], text_embeds=s["text_embeds"], text_mask=mask)
    alone = prunevlm.select("cdpruner", 8, image_tokens=s["image_tokens"][:1], text_embeds=s["text_embeds"][:1, :4])
    assert torch.equal(batch.keep[0], alone.keep[0])
    no_text = prunevlm.select("cdpruner", 8, image_tokens=s["image_tokens"], text_embeds=s["text_embeds"],
                              text_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert torch.equal(no_text.keep, prunevlm.select("cdpruner", 8, image_tokens=s["image_tokens"]).keep)


def test_cdpruner_theta_weights_tokens_by_exp_alpha_r():
    """The same computation as select's, the exponential in fp64 rounded to fp32 as the rule of
    docs/diversity.md has it, so the picks are equal on any CPU."""
    s = random_signals(1, 40, 16, seed=8)
    selection = prunevlm.select("cdpruner", 10, theta=0.5, **signals_for("cdpruner", s))
    r = relevance(s["image_tokens"], s["text_embeds"])
    quality = torch.exp(0.5 * r.double()).float()  # α = 0.5 / (2 · 0.5)
    order, _ = greedy_map(conditional_kernel(s["image_tokens"], quality), 10)
    assert torch.equal(selection.info["order"], order)


@pytest.mark.parametrize("options", [{"relevance_sign": 0}, {"theta": 1.0}, {"theta": -0.1}])
def test_cdpruner_refuses_out_of_range_options(options):
    with pytest.raises(ValueError, match="cdpruner: option"):
        prunevlm.select("cdpruner", 4, image_tokens=torch.randn(1, 10, 4), **options)


# -- VisionZip --------------------------------------------------------------------------------------------


def test_visionzip_splits_reproduce_the_published_counts():
    assert [(k - contextual_count(k, 5 / 32), contextual_count(k, 5 / 32)) for k in (64, 128, 192)] == [
        (54, 10), (108, 20), (162, 30)]


def test_visionzip_targets_stride_through_the_remaining_list():
    """Check 3: the 64-token split of the official code leaves R = 523 (53 patches + CLS dominant), c = 10:
    stride 52, targets at 0, 52, ..., 468. Here CLS is not a token, so R = 522, the same stride."""
    for remaining in (523, 522):
        targets, members = target_positions(remaining, 10)
        assert targets.tolist() == list(range(0, 469, 52))
        assert members.tolist() == [j for j in range(remaining) if j not in range(0, 469, 52)]
    targets, members = target_positions(5, 5)
    assert targets.tolist() == [0, 1, 2, 3, 4] and members.tolist() == []


def plain_visionzip(tokens, saliency, keys, k, ratio=5 / 32, merge="target_plus_mean"):
    """One image, written out: (kept slots ascending, value per slot) (docs/baselines.md, VisionZip)."""
    contextual = contextual_count(k, ratio)
    dominant = saliency.argsort(descending=True, stable=True)[: k - contextual].tolist()
    remaining = [j for j in range(tokens.shape[0]) if j not in dominant]
    stride = max(1, len(remaining) // contextual)
    targets = [remaining[p * stride] for p in range(contextual)]
    groups = {t: [] for t in targets}
    unit = F.normalize(keys.double(), dim=-1)  # cosines in fp64 rounded to fp32 (docs/diversity.md)
    for j in remaining:
        if j not in groups:
            similarity = [float((unit[j] @ unit[t]).float()) for t in targets]
            groups[targets[similarity.index(max(similarity))]].append(j)
    values = {j: tokens[j] for j in dominant}
    for t, members in groups.items():
        total = sum((tokens[j] for j in members), torch.zeros_like(tokens[t]))
        values[t] = tokens[t] + total / max(1, len(members)) if merge == "target_plus_mean" else (
            (tokens[t] + total) / (1 + len(members)))
    slots = sorted(values)
    return slots, torch.stack([values[j] for j in slots])


@pytest.mark.parametrize("merge", ["target_plus_mean", "average"])
@pytest.mark.parametrize("tokens,k", [(64, 32), (100, 20), (30, 7), (576, 64)])
def test_visionzip_equals_the_written_out_algorithm(tokens, k, merge):
    """Slots exactly (both choose targets by fp64 cosines rounded to fp32, ties to the first target, the
    rule of docs/diversity.md); the merged values, summed in another order, within the default tolerance."""
    s = random_signals(2, tokens, seed=tokens + k)
    selection = prunevlm.select("visionzip", k, merge=merge, **signals_for("visionzip", s))
    for row in range(2):
        slots, values = plain_visionzip(s["image_tokens"][row], s["saliency"][row], s["keys"][row], k, merge=merge)
        assert selection.keep[row].tolist() == slots
        torch.testing.assert_close(selection.tokens[row], values)
        assert selection.recycled[row].sum() == contextual_count(k, 5 / 32)
        assert set(selection.keep[row][selection.recycled[row]].tolist()) == set(selection.info["targets"][row].tolist())


@pytest.mark.parametrize("merge,doubled", [("target_plus_mean", 2.0), ("average", 1.0)])
def test_visionzip_constant_tokens(merge, doubled):
    """Check 2: all tokens equal v -> dominant tokens v; a contextual token 2v if its group is non-empty
    (official), v if empty; averaging gives v for both. Orthogonal keys tie every member at cosine 0, so
    all 27 join the first of the 2 targets and the second stays empty."""
    v = torch.randn(8)
    saliency = torch.rand(1, 40, generator=torch.Generator().manual_seed(0))
    selection = prunevlm.select("visionzip", 13, merge=merge, image_tokens=v.expand(1, 40, 8).clone(),
                                saliency=saliency, keys=torch.eye(40)[None])
    first, second = selection.info["targets"][0].tolist()
    for slot, value in zip(selection.keep[0].tolist(), selection.tokens[0]):
        torch.testing.assert_close(value, doubled * v if slot == first else v)
    assert selection.recycled[0].sum() == 2 and second in selection.keep[0].tolist()


def test_visionzip_dominant_tokens_are_the_most_salient_and_unchanged():
    s = random_signals(3, 100, seed=9)
    selection = prunevlm.select("visionzip", 32, **signals_for("visionzip", s))
    dominant = s["saliency"].argsort(dim=1, descending=True)[:, :27].sort(dim=1).values
    assert torch.equal(selection.info["dominant"], dominant)
    original = torch.gather(s["image_tokens"], 1, selection.keep[..., None].expand(-1, -1, 16))
    assert torch.equal(selection.tokens[~selection.recycled], original[~selection.recycled])


def test_visionzip_without_keys_merges_by_the_projected_tokens():
    s = random_signals(2, 60, seed=10)
    without = prunevlm.select("visionzip", 20, image_tokens=s["image_tokens"], saliency=s["saliency"])
    with_tokens_as_keys = prunevlm.select("visionzip", 20, image_tokens=s["image_tokens"], saliency=s["saliency"],
                                          keys=s["image_tokens"])
    assert torch.equal(without.keep, with_tokens_as_keys.keep) and torch.equal(without.tokens, with_tokens_as_keys.tokens)


def test_visionzip_with_no_contextual_share_is_top_k():
    s = random_signals(2, 60, seed=11)
    selection = prunevlm.select("visionzip", 20, contextual_ratio=0.0, **signals_for("visionzip", s))
    assert torch.equal(selection.keep, s["saliency"].argsort(dim=1, descending=True)[:, :20].sort(dim=1).values)
    assert selection.tokens is None


# -- properties (hypothesis; profiles in conftest.py, `make fuzz` runs them at 10,000 examples) ---------------


case = dict(batch=st.integers(1, 3), tokens=st.integers(2, 80), dim=st.integers(1, 24), seed=st.integers(0, 2**16),
            budget=st.one_of(st.integers(1, 100), st.floats(0.01, 1.0)))


def kept_count(budget, tokens):
    return min(budget, tokens) if isinstance(budget, int) else min(tokens, max(1, round(budget * tokens)))


@pytest.mark.property
@pytest.mark.parametrize("method", BASELINES)
@given(**case)
def test_exact_count_of_unique_ascending_indices_deterministically(method, batch, tokens, dim, seed, budget):
    s = signals_for(method, random_signals(batch, tokens, dim, seed=seed, dtype=torch.float32))
    first = prunevlm.select(method, budget, **s)
    assert first.keep.shape == (batch, kept_count(budget, tokens))
    assert (first.keep.diff(dim=1) > 0).all() and (first.keep >= 0).all() and (first.keep < tokens).all()
    again = prunevlm.select(method, budget, **s)
    assert torch.equal(first.keep, again.keep)
    assert (first.tokens is None and again.tokens is None) or torch.equal(first.tokens, again.tokens)
    if first.tokens is not None:
        assert first.tokens.shape == (batch, first.keep.shape[1], dim) and torch.isfinite(first.tokens).all()


@pytest.mark.property
@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
@given(**{**case, "dim": st.integers(2, 24)})
def test_a_permutation_of_the_tokens_permutes_the_selection(method, batch, tokens, dim, seed, budget):
    """Both are functions of the token set alone, up to ties: permuting the tokens permutes the kept set.
    Inputs are random in fp64 and at least 2 dimensions (in one, every cosine is ±1). The cosines are rounded
    to fp32 (docs/diversity.md), the same wherever a token sits, and an exact tie goes to the lowest index, so
    where DivPrune's greedy meets a tie the kept set depends on positions: such inputs are left out. Ties are
    not rare: the first pick ties whenever the token whose nearest neighbour is farthest is that neighbour's
    nearest too (always for N = 2), and in 2 to 3 dimensions many distances round to one fp32 value (the
    fuzz profile found N = 71, d = 2)."""
    s = signals_for(method, random_signals(batch, tokens, dim, seed=seed))
    if method == "divprune":
        assume(not any(max_min_ties(row, kept_count(budget, tokens)) for row in s["image_tokens"]))
    permutation = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))
    permuted = {name: value[:, permutation] if name != "text_embeds" else value for name, value in s.items()}
    keep = prunevlm.select(method, budget, **s).keep
    keep_permuted = prunevlm.select(method, budget, **permuted).keep
    assert torch.equal(permutation[keep_permuted].sort(dim=1).values, keep)


@pytest.mark.property
@given(**case)
def test_visionzip_dominant_tokens_follow_a_permutation(batch, tokens, dim, seed, budget):
    """The dominant share depends on the saliency alone (the contextual targets on raster order, by design)."""
    assume(kept_count(budget, tokens) < tokens)  # the whole image has no dominant share
    s = signals_for("visionzip", random_signals(batch, tokens, dim, seed=seed))
    permutation = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))
    dominant = prunevlm.select("visionzip", budget, **s).info["dominant"]
    permuted = prunevlm.select("visionzip", budget, **{name: value[:, permutation] for name, value in s.items()})
    assert torch.equal(permutation[permuted.info["dominant"]].sort(dim=1).values, dominant)


@pytest.mark.property
@given(tokens=st.integers(2, 60), copies=st.integers(2, 4), seed=st.integers(0, 2**16), k=st.integers(1, 200))
def test_divprune_never_repeats_on_duplicated_tokens(tokens, copies, seed, k):
    base = torch.randn(tokens, 6, generator=torch.Generator().manual_seed(seed))
    duplicated = base.repeat(copies, 1)[None]
    order = prunevlm.select("divprune", min(k, tokens * copies), image_tokens=duplicated).keep[0]
    assert order.unique().numel() == order.numel()
    # the first `tokens` picks cover every distinct token before any copy is taken twice
    picks = max_min_order(cosine_distances(duplicated), min(k, tokens * copies - 1))[0] % tokens
    assert picks[:tokens].unique().numel() == min(tokens, picks.numel())


# -- clip scale (docs/baselines.md, "Clip scale") ----------------------------------------------------------


def clip_cases():
    """Random tokens, exact duplicates (40 distinct among 300) and near duplicates (every other copy one fp32
    ulp apart in one coordinate): the cases where one rounding of a cosine would reorder the picks."""
    g = torch.Generator().manual_seed(5)
    random = torch.randn(300, 16, generator=g)
    duplicates = random[torch.randint(0, 40, (300,), generator=g)]
    near = duplicates.clone()
    near[::2, 0] = torch.nextafter(near[::2, 0], torch.tensor(math.inf))
    return {"random": random, "duplicates": duplicates, "near duplicates": near}


@pytest.mark.parametrize("case", ["random", "duplicates", "near duplicates"])
@pytest.mark.parametrize("k", [1, 30, 150, 299])
def test_divprune_streamed_rows_pick_as_the_whole_matrix(case, k):
    """Rows computed 32 at a time (first pass and `RowCache`) give the picks of the N x N distances, in order."""
    tokens = clip_cases()[case]
    whole = max_min_order(cosine_distances(tokens[None]), k)[0]
    assert torch.equal(streamed_max_min_order(unit_rows(tokens), k, block=32), whole)


@pytest.mark.parametrize("case", ["random", "duplicates", "near duplicates"])
@pytest.mark.parametrize("k", [1, 30, 150, 300])
def test_cdpruner_streamed_rows_pick_as_the_whole_kernel(case, k):
    """Kernel rows formed 32 at a time with their projections give the whole kernel's picks, in order (past
    the kernel's rank too: the duplicates run out of gain), and the same gains up to fp64 rounding."""
    tokens = clip_cases()[case]
    quality = relevance(tokens[None], torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(6)))[0]
    order, gains = greedy_map(conditional_kernel(tokens[None], quality[None]), k)
    streamed, streamed_gains = streamed_greedy_map(unit_rows(tokens), quality, k, block=32)
    assert torch.equal(streamed, order[0])
    torch.testing.assert_close(streamed_gains, gains[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
def test_beyond_the_whole_matrix_size_rows_come_in_blocks_with_the_same_picks(method, monkeypatch):
    """Above WHOLE_MATRIX_TOKENS (lowered to 100 here) no N x N matrix is formed: every cosine product has at
    most ROW_BLOCK (lowered to 32) rows, and `prunevlm.select` keeps what the whole matrix keeps."""
    module = sys.modules[METHODS[method].__module__]
    s = signals_for(method, random_signals(2, 150, 12, seed=8))
    whole = prunevlm.select(method, 40, **s)
    shapes = []

    def recorded(a, b):
        shapes.append(a.shape[-2])
        return cosines(a, b)

    monkeypatch.setattr(module, "WHOLE_MATRIX_TOKENS", 100)
    monkeypatch.setattr(module, "ROW_BLOCK", 32)
    monkeypatch.setattr(module, "cosines", recorded)
    streamed = prunevlm.select(method, 40, **s)
    assert shapes and max(shapes) <= 32
    assert torch.equal(streamed.keep, whole.keep) and torch.equal(streamed.info["order"], whole.info["order"])


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
def test_clip_segment_leaves_images_frames_and_short_clips_as_released(method):
    """A clip of at most `clip_segment` frames, a frame alone (`frames` (1, h, w)) and an image choose as
    without the option, index for index."""
    s = signals_for(method, random_signals(1, 96, 12, seed=9))
    released = prunevlm.select(method, 20, clip_segment=None, **s)
    for frames in [(6, 4, 4), (1, 8, 12), None]:
        chosen = prunevlm.select(method, 20, clip_segment=6, **s, **({} if frames is None else {"frames": frames}))
        assert torch.equal(chosen.info["order"], released.info["order"])


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
def test_clip_segment_chooses_each_run_then_the_pool(method):
    """A 6-frame clip of 4 x 4 tokens in runs of 2 frames: each run of 32 tokens keeps ⌈2 · k · 32 / 96⌉ by the
    method on that run alone, then the pooled tokens, ascending, keep k: written out here with the whole-matrix
    greedy of each (CDPruner's relevance is the clip's in both steps)."""
    s = signals_for(method, random_signals(1, 96, 12, seed=10))
    k = 10
    chosen = prunevlm.select(method, k, clip_segment=2, frames=(6, 4, 4), **s)
    unit = unit_rows(s["image_tokens"][0])
    quality = relevance(s["image_tokens"], s["text_embeds"])[0] if method == "cdpruner" else None

    def greedy(positions, count):
        if method == "divprune":
            return positions[max_min_order((1.0 - cosines(unit[positions], unit[positions]))[None], count)[0]]
        q = quality[positions].double()
        return positions[greedy_map((q[:, None] * cosines(unit[positions], unit[positions]).double() * q)[None],
                                    count)[0][0]]

    pool = torch.cat([greedy(torch.arange(run, run + 32), math.ceil(2 * k * 32 / 96)) for run in (0, 32, 64)])
    assert torch.equal(chosen.info["order"][0], greedy(pool.sort().values, k))
    assert chosen.keep.shape == (1, k) and chosen.keep[0].unique().numel() == k


# -- on the tiny models ------------------------------------------------------------------------------------

FAMILIES = {
    "llava": (tiny.llava, lambda: tiny.llava_inputs([1, 0, 2])),
    "qwen2_vl": (tiny.qwen2_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 8), (4, 4)]])),
    "qwen2_5_vl": (tiny.qwen2_5_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 12), (4, 4)]])),
}
IMAGES_PER_ROW = [1, 0, 2]
GENERATE = dict(max_new_tokens=5, **tiny.GREEDY)


@pytest.fixture(params=list(FAMILIES))
def family(request):
    make, inputs = FAMILIES[request.param]
    return request.param, make(), inputs()


@torch.no_grad()
@pytest.mark.parametrize("method", BASELINES)
def test_full_budget_is_identity_and_remove_restores(family, method):
    name, model, inputs = family
    logits = model(**inputs).logits
    ids = model.generate(**inputs, **GENERATE)
    handle = prunevlm.prune(model, method, budget=1.0)
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(model.generate(**inputs, **GENERATE), ids)
    model(**inputs)
    assert handle.stats.tokens_after == handle.stats.tokens_before
    handle.remove()
    with prunevlm.prune(model, method, budget=3):
        assert not torch.equal(model(**inputs).logits[:, -1], logits[:, -1])  # pruning changes the output
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(model.generate(**inputs, **GENERATE), ids)


@torch.no_grad()
@pytest.mark.parametrize("method", BASELINES)
def test_prefill_and_every_layer_cache_hold_text_plus_budget_per_image(family, method):
    name, model, inputs = family
    budget = 3
    image_id = tiny.LLAVA_IMAGE if name == "llava" else tiny.QWEN_IMAGE
    text = ((inputs["input_ids"] != image_id) & inputs["attention_mask"].bool()).sum(dim=1).tolist()
    expected = [t + budget * n for t, n in zip(text, IMAGES_PER_ROW)]
    with prunevlm.prune(model, method, budget=budget) as handle:
        out = model(**inputs, use_cache=True)
        assert handle.stats.prefill_after == expected
        assert handle.stats.tokens_after == [[budget] * n for n in IMAGES_PER_ROW]
        assert all(layer.keys.shape[-2] == max(expected) for layer in output_cache(out).layers)


@torch.no_grad()
@pytest.mark.parametrize("method", BASELINES)
def test_left_padded_batch_equals_rows_run_alone(family, method):
    """A batch of 3 (one text-only row) gives the logits and tokens of its rows run one by one. Budget 7
    gives VisionZip one contextual (merged) token per image (round(7 · 5/32) = 1), except on Qwen's 4-token
    image, which stays whole."""
    name, model, inputs = family
    with prunevlm.prune(model, method, budget=7) as handle:
        model(**inputs)
        if method == "visionzip":
            merged = [[1], [], [1, 1]] if name == "llava" else [[1], [], [1, 0]]
            assert [[r.numel() for r in row] for row in handle.stats.recycled] == merged
        firsts = [sum(IMAGES_PER_ROW[:row]) for row in range(len(IMAGES_PER_ROW))]
        singles = [tiny.row_inputs(inputs, row, first, count, "llava" if name == "llava" else "qwen")
                   for row, (first, count) in enumerate(zip(firsts, IMAGES_PER_ROW))]
        tiny.assert_batch_equals_rows(model, inputs, singles, **GENERATE)


@torch.no_grad()
def test_llava_keys_are_the_feature_layers_keys_averaged_over_heads():
    model, inputs = tiny.llava(), tiny.llava_inputs([2])
    with prunevlm.prune(model, "visionzip", budget=1.0) as handle:
        tokens = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        recorded = torch.stack([s["keys"] for s in handle.runtime.capture.match(list(tokens))[0]])
    tower = model.model.vision_tower
    hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    layer = tower.encoder.layers[-2]  # vision_feature_layer = -2: its output is hidden_states[-2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[-3]))
    expected = keys.view(2, 17, 4, 16).mean(dim=2)[:, 1:]
    torch.testing.assert_close(recorded, expected)


@torch.no_grad()
def test_qwen_keys_are_per_merged_token_and_per_image():
    model = tiny.qwen2_5_vl()
    both = tiny.qwen_inputs([[(8, 12), (4, 4)]])
    with prunevlm.prune(model, "visionzip", budget=1.0) as handle:
        tokens = model.model.get_image_features(both["pixel_values"], both["image_grid_thw"]).pooler_output
        together = [s["keys"] for s in handle.runtime.capture.match(list(tokens))[0]]
        first = both["pixel_values"][: 8 * 12]
        tokens = model.model.get_image_features(first, both["image_grid_thw"][:1]).pooler_output
        alone = handle.runtime.capture.match(list(tokens))[0][0]["keys"]
    assert together[0].shape == (24, 8) and together[1].shape == (4, 8)
    torch.testing.assert_close(together[0], alone)


@torch.no_grad()
def test_cdpruner_follows_the_prompt_and_divprune_does_not():
    """The same image under another question: cdpruner's relevance comes from the prompt's embeddings, so
    its choice moves; divprune is text-agnostic, so its choice stays."""
    model = tiny.llava()
    first, second = tiny.llava_inputs([1], seed=0), tiny.llava_inputs([1], seed=1)
    second["pixel_values"] = first["pixel_values"]

    def kept(method, inputs):
        with prunevlm.prune(model, method, budget=6) as handle:
            model(**inputs)
            return handle.stats.kept[0][0].tolist()

    assert kept("cdpruner", first) != kept("cdpruner", second)
    assert kept("divprune", first) == kept("divprune", second)
