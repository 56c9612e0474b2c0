"""The selection methods on random and synthetic signals (no model)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import prunevlm
from prunevlm.methods import diversity
from prunevlm.methods.diversity import bipartite_dedup, drops_per_round, nearest_neighbours, symmetric_gram
from prunevlm.methods.flashvlm import fuse, sharpen, text_relevance
from prunevlm.methods.uniform import grid_sample


def signals(batch=2, tokens=64, dim=16, text=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "image_tokens": torch.randn(batch, tokens, dim, generator=g, dtype=dtype),
        "features": torch.randn(batch, tokens, dim + 4, generator=g, dtype=dtype),
        "saliency": torch.rand(batch, tokens, generator=g, dtype=dtype),
        "text_embeds": torch.randn(batch, text, dim, generator=g, dtype=dtype),
    }


def naive_dedup(features, order, keep, step=8, schedule="fixed", ratio=0.1):
    """The released loop: recompute the |A|x|B| similarities every round (docs/flashvlm.md §7), under the
    rule of docs/diversity.md ("Same result on every CPU"): cosines in fp64, rounded to fp32."""
    unit = F.normalize(features.double(), dim=-1)
    out = []
    for b in range(features.shape[0]):
        current = order[b]
        while current.numel() > keep:
            r = drops_per_round(current.numel(), keep, step, schedule, ratio)
            side_a, side_b = current[0::2], current[1::2]
            redundancy = (unit[b, side_a] @ unit[b, side_b].T).float().amax(dim=1)
            ranked = redundancy.argsort(descending=True, stable=True)
            current = torch.cat([side_a[ranked[r:]], side_b])
        out.append(current)
    return torch.stack(out)


@pytest.mark.parametrize("schedule", ["fixed", "geometric"])
@pytest.mark.parametrize("batch,tokens,dim,keep", [(2, 576, 64, 32), (1, 300, 1024, 64), (3, 100, 8, 7), (1, 50, 4, 1)])
def test_fast_dedup_equals_released_loop(schedule, batch, tokens, dim, keep):
    """Index for index: the fast rounds and the released loop compare the same fp32-rounded cosines, whatever
    product computed them (docs/diversity.md, "Same result on every CPU"), so they agree on any CPU."""
    g = torch.Generator().manual_seed(tokens + keep)
    features = torch.randn(batch, tokens, dim, generator=g, dtype=torch.float64)
    order = torch.stack([torch.randperm(tokens, generator=g) for _ in range(batch)])
    assert torch.equal(bipartite_dedup(features, order, keep, schedule=schedule), naive_dedup(features, order, keep, schedule=schedule))


def test_fast_dedup_equals_released_loop_on_clustered_data():
    """As above, on tight clusters, where the cosines that decide a round lie close together."""
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(8, 32, generator=g, dtype=torch.float64), dim=-1)
    points = centres[torch.randint(8, (400,), generator=g)] + 0.01 * torch.randn(400, 32, generator=g, dtype=torch.float64)
    order = torch.randperm(400, generator=g)[None]
    assert torch.equal(bipartite_dedup(points[None], order, 20), naive_dedup(points[None], order, 20))


@pytest.mark.parametrize("chunk_rows", [1024, 96, 16])
@pytest.mark.parametrize("neighbours", [64, 3])
@pytest.mark.parametrize("schedule", ["fixed", "geometric"])
def test_neighbour_lists_equal_released_loop(monkeypatch, neighbours, schedule, chunk_rows):
    """The path for more than DENSE_TOKENS tokens, forced on a small input; short lists force rebuilds,
    short chunks split the lists' cosine matrix into blocks (the last one partial) and the rebuilds too.
    Exact on any CPU: every path rounds its fp64 cosines to fp32 (docs/diversity.md, "Same result on every CPU")."""
    monkeypatch.setattr(diversity, "DENSE_TOKENS", 0)
    monkeypatch.setattr(diversity, "NEIGHBOURS", neighbours)
    monkeypatch.setattr(diversity, "CHUNK_ROWS", chunk_rows)
    g = torch.Generator().manual_seed(neighbours)
    features = torch.randn(2, 400, 32, generator=g, dtype=torch.float64)
    order = torch.stack([torch.randperm(400, generator=g) for _ in range(2)])
    assert torch.equal(bipartite_dedup(features, order, 40, schedule=schedule),
                       naive_dedup(features, order, 40, schedule=schedule))


@pytest.mark.parametrize("chunk_rows", [1024, 96, 7])
def test_nearest_neighbours_are_the_top_of_each_row(monkeypatch, chunk_rows):
    """Lists built from the blocks on and above the diagonal equal each row's top of the full matrix. Exactly:
    an fp64 cosine rounded to fp32 does not depend on the product that computed it (docs/diversity.md, "Same
    result on every CPU"), and this seed has no tie in any row's top."""
    monkeypatch.setattr(diversity, "CHUNK_ROWS", chunk_rows)
    unit = F.normalize(torch.randn(250, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1)
    full = (unit @ unit.T).float().fill_diagonal_(-math.inf)
    similarity, neighbours = nearest_neighbours(unit, 10)
    expected, expected_index = full.topk(10, dim=1)
    assert torch.equal(similarity, expected)
    assert torch.equal(neighbours, expected_index)


@pytest.mark.parametrize("seed", range(3))
def test_fast_dedup_breaks_ties_like_the_released_loop(seed):
    """Exact duplicates (flat background patches) in fp32: every tie must fall the same way. The duplicates'
    cosines are bit-equal in both paths on any CPU because both round fp64 cosines to fp32 (docs/diversity.md,
    "Same result on every CPU"; the two paths take different products, and their fp32 cosines differed in the
    last bit on AVX512, issue #25)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(12, 1024, generator=g)[torch.randint(12, (576,), generator=g)]
    order = torch.randperm(576, generator=g)[None]
    assert torch.equal(bipartite_dedup(points[None], order, 32), naive_dedup(points[None], order, 32))


def test_symmetric_gram_equals_the_product():
    """The product rounded to fp32, exactly: the blocks sum in another order than the whole product, which the
    rounding of fp64 cosines to fp32 absorbs (docs/diversity.md, "Same result on every CPU")."""
    unit = F.normalize(torch.randn(545, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1)
    gram = symmetric_gram(unit)
    assert gram.dtype == torch.float32
    assert torch.equal(gram, (unit @ unit.T).float())
    assert torch.equal(gram[:272, 272:], gram[272:, :272].T)


def test_dedup_rounds_match_the_released_count():
    stats = {}
    tokens, k = 576, 64
    order = torch.randperm(tokens)[None]
    bipartite_dedup(torch.randn(1, tokens, 16), order, k, stats=stats)
    assert stats["rounds"] == math.ceil((tokens - k) / 8)  # docs/flashvlm.md §9 (1)


@pytest.mark.parametrize("clusters", [16, 32])
def test_diversity_keeps_every_cluster_at_twice_the_cluster_count(clusters):
    """docs/flashvlm.md §9 (2): T_div >= 2K keeps a member of every cluster in >= 99 of 100 seeds."""
    covered, radii = 0, []
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(clusters, 64, generator=g), dim=-1)
        labels = torch.randint(clusters, (576,), generator=g)
        labels[:clusters] = torch.arange(clusters)
        points = F.normalize(centres[labels] + 0.01 * torch.randn(576, 64, generator=g), dim=-1)
        kept = bipartite_dedup(points[None], torch.randperm(576, generator=g)[None], 2 * clusters)[0]
        covered += int(labels[kept].unique().numel() == clusters)
        radii.append((1 - points @ points[kept].T).amin(dim=1).max())
    assert covered >= 99
    # the cover radius is the cluster spread (1 - cos ~ 1e-2 at most here), far below a random subset's
    assert torch.stack(radii).median() < 0.02


def saliency_of(kind, batch, tokens, seed=0):
    """Saliencies that stress the ranking: heavy tails put many values under FlashVLM's 1e-6 floor, and
    ties (exact zeros, a few repeated levels) leave the order to the tie-break alone."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, tokens, generator=g)
    if kind == "uniform":
        return u
    if kind.startswith("pow"):
        return u ** int(kind[3:])
    if kind == "zeros":  # three quarters exactly zero, the rest heavy-tailed (some of it below the floor)
        return torch.where(u < 0.75, 0.0, torch.rand(batch, tokens, generator=g) ** 8)
    if kind == "levels":  # five repeated values
        return (u * 5).floor() / 4
    if kind == "fp16":
        return (u ** 8).half()
    raise ValueError(kind)


def same_selection(a, b):
    """Index-identical: kept set, important share, and the diverse share in the partition's final order."""
    return all(torch.equal(a.info[key], b.info[key]) for key in ("important", "diverse")) and torch.equal(a.keep, b.keep)


@pytest.mark.parametrize("kind", ["uniform", "pow3", "pow8", "zeros", "levels", "fp16"])
def test_vispruner_equals_flashvlm_without_text(kind):
    """flashvlm.py's module docstring: with no text the ranking score is the saliency itself (docs/methods.md),
    so the selection equals VisPruner's for any saliency, whatever the floor would have tied. Both run the same
    computation on the same numbers, so the comparison is exact on any CPU."""
    s = signals(batch=3, tokens=576, dim=16)
    saliency = saliency_of(kind, 3, 576)
    no_text = [{}, {"text_embeds": s["text_embeds"][:, :0]},
               {"text_embeds": s["text_embeds"], "text_mask": torch.zeros(3, 7, dtype=torch.bool)}]
    differ, scored = [], []
    for budget in (1, 5, 32, 64, 128, 0.25, 575):
        vis = prunevlm.select("vispruner", budget, image_tokens=s["image_tokens"], saliency=saliency, features=s["features"])
        for text in no_text:
            flash = prunevlm.select("flashvlm", budget, image_tokens=s["image_tokens"], saliency=saliency,
                                    features=s["features"], **text)
            if not same_selection(vis, flash):
                differ.append((budget, sorted(text)))
            scored.append(torch.equal(flash.scores, saliency.float()))
    assert differ == []
    assert all(scored)


@pytest.mark.parametrize("kind", ["pow3", "pow8", "zeros"])
def test_flashvlm_rows_without_text_equal_vispruner_in_a_mixed_batch(kind):
    """A row whose text_mask is all False selects as VisPruner on that row; a row with text as FlashVLM on
    that row alone. Exact: the batched products sum in other orders than a row's alone, which the rounding of
    fp64 scores and cosines to fp32 absorbs (docs/diversity.md, "Same result on every CPU")."""
    s = signals(batch=2, tokens=576, dim=16)
    saliency = saliency_of(kind, 2, 576, seed=1)
    mask = torch.tensor([[True] * 5 + [False] * 2, [False] * 7])  # row 0: 5 text rows and padding; row 1: none
    for budget in (8, 64, 128):
        batch = prunevlm.select("flashvlm", budget, image_tokens=s["image_tokens"], saliency=saliency,
                                features=s["features"], text_embeds=s["text_embeds"], text_mask=mask)
        with_text = prunevlm.select("flashvlm", budget, image_tokens=s["image_tokens"][:1], saliency=saliency[:1],
                                    features=s["features"][:1], text_embeds=s["text_embeds"][:1, :5])
        without = prunevlm.select("vispruner", budget, image_tokens=s["image_tokens"][1:], saliency=saliency[1:],
                                  features=s["features"][1:])
        for row, alone in ((0, with_text), (1, without)):
            assert torch.equal(batch.keep[row], alone.keep[0])
            assert all(torch.equal(batch.info[key][row], alone.info[key][0]) for key in ("important", "diverse"))
            assert torch.equal(batch.scores[row], alone.scores[0])
        assert not torch.equal(batch.scores[0], saliency[0])  # the text row is fused, not the saliency


def test_flashvlm_official_no_text_score_keeps_the_floor_ties():
    """no_text_score="fused" is the official computation without text: the fused formula with T ≡ ε, whose
    floor ties the lowest saliencies, so it departs from VisPruner on a heavy-tailed saliency."""
    s = signals(batch=2, tokens=576)
    saliency = saliency_of("pow8", 2, 576)
    official = prunevlm.select("flashvlm", 64, image_tokens=s["image_tokens"], saliency=saliency, no_text_score="fused")
    assert torch.equal(official.scores, fuse(saliency, None))
    vis = prunevlm.select("vispruner", 64, image_tokens=s["image_tokens"], saliency=saliency)
    assert not torch.equal(official.keep, vis.keep)
    with pytest.raises(ValueError, match="option no_text_score must be one of 'saliency', 'fused', got 'cls'"):
        prunevlm.select("flashvlm", 64, image_tokens=s["image_tokens"], saliency=saliency, no_text_score="cls")


def test_flashvlm_with_text_ranks_by_the_fused_score():
    """The text path is the formula of docs/flashvlm.md §5 on every row."""
    s = signals(batch=2, tokens=144)
    s["saliency"] = saliency_of("pow8", 2, 144)
    method = prunevlm.api.METHODS["flashvlm"]()
    expected = fuse(s["saliency"], method.text_score(s["image_tokens"], s["text_embeds"], None))
    for no_text_score in ("saliency", "fused"):
        assert torch.equal(prunevlm.select("flashvlm", 16, no_text_score=no_text_score, **s).scores, expected)


def test_text_changes_the_flashvlm_selection():
    s = signals(tokens=144)
    with_text = prunevlm.select("flashvlm", 16, **s)
    without = prunevlm.select("flashvlm", 16, image_tokens=s["image_tokens"], saliency=s["saliency"], features=s["features"])
    assert not torch.equal(with_text.keep, without.keep)


def test_sharpening_matches_the_closed_form():
    """docs/flashvlm.md §3 (6): t_i ≈ 0.1^[i not in top] · exp(250 (s_i − max s)), |Δ log t| <= 0.05 in fp32."""
    g = torch.Generator().manual_seed(0)
    for spread in (0.01, 0.02, 0.05):
        relevance = 0.2 + spread * torch.randn(3, 576, generator=g)
        t = sharpen(relevance)
        top = t >= torch.quantile(t, 1 - 0.005, dim=-1, keepdim=True)
        closed = torch.where(top, 1.0, 0.1) * torch.exp(250 * (relevance - relevance.amax(dim=-1, keepdim=True)))
        above = t > 1e-6
        assert above.sum() >= 12
        assert (t[above].log() - closed[above].log()).abs().max() <= 0.05


def test_text_relevance_pools_with_a_softmax_over_text():
    s = signals(batch=1, tokens=5, text=3)
    cos = F.normalize(s["image_tokens"], dim=-1) @ F.normalize(s["text_embeds"], dim=-1).transpose(1, 2)
    expected = (torch.softmax(cos / 0.05, dim=-1) * cos).sum(-1)
    assert torch.allclose(text_relevance(s["image_tokens"], s["text_embeds"]), expected, atol=1e-6)
    # padded text rows change nothing
    padded = torch.cat([s["text_embeds"], torch.randn(1, 2, 16)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    assert torch.allclose(text_relevance(s["image_tokens"], padded, mask), expected, atol=1e-6)


def test_fusion_is_a_geometric_mean_in_the_log_domain():
    saliency = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    text = torch.tensor([[1.0, 0.0, 0.25, 1.0]])
    a = saliency.clamp_min(1e-6)
    f = (a.sqrt() * text.clamp_min(1e-6).sqrt())
    f = (f - f.min()) / (f.max() - f.min())
    assert torch.allclose(fuse(saliency, text), f)
    assert torch.equal(fuse(saliency, None).argsort(descending=True), saliency.argsort(descending=True))


def test_flashvlm_split_important_then_diverse():
    s = signals(batch=1, tokens=100)
    selection = prunevlm.select("flashvlm", 20, **s)
    important, diverse = selection.info["important"], selection.info["diverse"]
    assert important.shape[1] == 10 and diverse.shape[1] == 10
    assert torch.equal(important[0].sort().values, selection.scores[0].topk(10).indices.sort().values)
    assert torch.equal(torch.cat([important, diverse], 1).sort(1).values, selection.keep)


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(["flashvlm", "vispruner", "random", "uniform"]),
    batch=st.integers(1, 3),
    side=st.integers(1, 12),
    budget=st.one_of(st.integers(1, 200), st.floats(0.01, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_selection_invariants(method, batch, side, budget, seed):
    """Unique ascending indices, the exact count, and determinism under a seed."""
    tokens = side * side
    s = signals(batch=batch, tokens=tokens, seed=seed)
    s["grid"] = (side, side)
    needed = prunevlm.api.METHODS[method].signals + prunevlm.api.METHODS[method].optional_signals
    s = {k: v for k, v in s.items() if k in needed}
    first = prunevlm.select(method, budget, **s).keep
    k = min(budget, tokens) if isinstance(budget, int) else min(tokens, max(1, round(budget * tokens)))
    assert first.shape == (batch, k)
    assert (first.diff(dim=1) > 0).all()
    assert ((first >= 0) & (first < tokens)).all()
    assert torch.equal(first, prunevlm.select(method, budget, **s).keep)


def test_random_is_seeded():
    x = torch.randn(1, 50, 4)
    assert torch.equal(prunevlm.select("random", 10, image_tokens=x, seed=3).keep, prunevlm.select("random", 10, image_tokens=x, seed=3).keep)
    assert not torch.equal(prunevlm.select("random", 10, image_tokens=x, seed=3).keep, prunevlm.select("random", 10, image_tokens=x, seed=4).keep)


def test_uniform_spreads_over_the_grid():
    keep = grid_sample(24, 24, 64)
    rows, cols = keep // 24, keep % 24
    for half in (rows < 12, cols < 12):
        assert half.sum() == 32
    assert torch.equal(grid_sample(24, 24, 576), torch.arange(576))


def test_list_methods_names_signals_and_options():
    methods = {m["name"]: m for m in prunevlm.list_methods()}
    assert {"flashvlm", "vispruner", "random", "uniform"} <= set(methods)
    assert methods["flashvlm"]["options"]["eta"] == 0.5
    assert "text_embeds" in methods["flashvlm"]["optional_signals"]
    assert methods["uniform"]["signals"] == ["image_tokens"] and methods["uniform"]["optional_signals"] == ["grid", "planes"]


def test_uniform_spreads_a_clip_budget_evenly_in_time():
    # 32 frames of 8 x 16 at 10 %: 409 = 32 x 12 + 25; the 25 extra tokens go to frames spread over the clip,
    # not to the first 25 (a tie of remainders between planes of one size)
    keep = prunevlm.select("uniform", 409, image_tokens=torch.zeros(1, 32 * 128, 4), planes=((8, 16),) * 32).keep[0]
    per_frame = torch.bincount(keep // 128, minlength=32)
    assert per_frame.sum() == 409 and set(per_frame.tolist()) == {12, 13}
    extra = (per_frame == 13).int()
    assert abs(int(extra[:16].sum()) - int(extra[16:].sum())) <= 1 and extra[0] == 1
    assert all(extra[i:i + 4].sum() >= 2 for i in range(0, 32, 4))  # no long run of frames without one
    for frame in range(32):  # each frame's share evenly over its grid
        own = keep[(keep // 128) == frame] - 128 * frame
        assert torch.equal(own, grid_sample(8, 16, int(per_frame[frame])))


def test_segmented_dedup_is_the_rounds_on_each_run_of_frames_then_on_their_pool(monkeypatch):
    """Index for index against the released loop applied as the two steps say (docs/diversity.md, "Clip
    scale"): each run of `segment` frames, in residual order, to ⌈POOL · keep · its size / R⌉, then their
    pool, in residual order, to keep; the lists path (forced, short lists) gives the same."""
    g = torch.Generator().manual_seed(3)
    frames, size, keep, segment = 10, 36, 30, 3
    features = torch.randn(2, frames * size, 16, generator=g, dtype=torch.float64)
    order = torch.stack([torch.randperm(frames * size, generator=g) for _ in range(2)])
    frame = torch.arange(frames * size) // size
    expected = []
    for b in range(2):
        runs = frame[order[b]] // segment
        pool = []
        for run in runs.unique():
            part = order[b][runs == run]
            share = min(part.numel(), math.ceil(diversity.POOL * keep * part.numel() / order.shape[1]))
            pool.append(naive_dedup(features[b : b + 1], part[None], share)[0])
        pooled = torch.cat(pool)
        in_order = order[b][torch.isin(order[b], pooled)]  # the pool in residual order
        expected.append(naive_dedup(features[b : b + 1], in_order[None], keep)[0])
    got = diversity.segmented_dedup(features, order, keep, frame, segment)
    assert torch.equal(got, torch.stack(expected))
    assert not torch.equal(got, bipartite_dedup(features, order, keep))  # the two steps choose otherwise
    monkeypatch.setattr(diversity, "DENSE_TOKENS", 0)
    monkeypatch.setattr(diversity, "NEIGHBOURS", 6)
    assert torch.equal(diversity.segmented_dedup(features, order, keep, frame, segment), got)


def test_a_segment_over_the_whole_clip_is_the_released_partition_and_images_ignore_it():
    """The default (8 frames) leaves short clips, frames selected alone and images as released."""
    s = signals(batch=2, tokens=6 * 32)
    exact = prunevlm.select("flashvlm", 40, frames=(6, 4, 8), dedup_segment=None, **s).keep
    assert torch.equal(prunevlm.select("flashvlm", 40, frames=(6, 4, 8), **s).keep, exact)  # 6 frames <= 8
    assert torch.equal(prunevlm.select("flashvlm", 40, frames=(6, 4, 8), dedup_segment=6, **s).keep, exact)
    assert not torch.equal(prunevlm.select("flashvlm", 40, frames=(6, 4, 8), dedup_segment=2, **s).keep, exact)
    image = {name: value[:, :32] for name, value in s.items() if name != "text_embeds"}
    assert torch.equal(prunevlm.select("vispruner", 12, dedup_segment=1, **image).keep,
                       prunevlm.select("vispruner", 12, **image).keep)
    with pytest.raises(ValueError, match="option dedup_segment must be >= 1, got 0"):
        prunevlm.select("vispruner", 12, dedup_segment=0, **image)
