"""Selection at serving scale (issue #18): one method call for a batch of images selects exactly what each
image selects alone, in the runtime one call per group of same-sized images, and nothing on the hot path
reads the device back to the host."""

import math

import pytest
import torch

import prunevlm
import tiny
from prunevlm.methods import METHODS, diversity
from prunevlm.methods.portable import unit_rows
from prunevlm.methods.vflowopt import recycle
from syncguard import HostReadError, NoHostReads

OURS = ("flashvlm", "vispruner", "vflowopt", "random", "uniform")


def batch_signals(batch=5, side=12, dim=24, text=9, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    tokens = side * side
    saliency = torch.rand(batch, tokens, generator=g)
    if ties:  # repeated levels and exact zeros: the order is left to the tie-breaks
        saliency = torch.where(saliency < 0.5, 0.0, (saliency * 4).floor())
    return {
        "image_tokens": torch.randn(batch, tokens, dim, generator=g),
        "features": torch.randn(batch, tokens, dim + 8, generator=g),
        "saliency": saliency,
        "text_embeds": torch.randn(batch, text, dim, generator=g),
        "attention": torch.rand(batch, tokens, tokens, generator=g).softmax(dim=-1),
        "patches": torch.randn(batch, tokens, 3, 4, 4, generator=g),
        "grid": (side, side),
    }


def taken_by(method, signals):
    return {name: value for name, value in signals.items() if name in method.signals + method.optional_signals}


def row(signals, i):
    return {name: value if name == "grid" else value[i : i + 1] for name, value in signals.items()}


def same(a, b, i):
    """Row i of selection a equals the only row of b, in every field the method fills."""
    for field in ("keep", "tokens", "importance", "recycled", "scores"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert torch.equal(x[i], y[0]), field
    for key, value in a.info.items():
        assert torch.equal(value[i], b.info[key][0]), key


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True)])
@pytest.mark.parametrize("budget", [1, 7, 36, 100, 0.3])
def test_a_batch_selects_what_each_image_selects_alone(name, seed, ties, budget):
    """Every field exactly: the batched products sum in other orders than an image's alone, which the
    rounding of fp64 scores and cosines to fp32 absorbs (docs/diversity.md, "Same result on every CPU");
    VFlowOpt's recycled values add the same fp32 numbers in the same ranked order; random and uniform are
    integer operations."""
    method = METHODS[name]()
    signals = taken_by(method, batch_signals(seed=seed, ties=ties))
    batched = method(prunevlm.Budget(budget), **signals)
    for i in range(5):
        same(batched, method(prunevlm.Budget(budget), **row(signals, i)), i)


def recycle_one(scores, tokens, grid, count, cell):
    """The per-image recycling as released before batching (issue #18), kept as the reference."""
    num_tokens = scores.numel()
    ranked = scores.argsort(descending=True, stable=True)
    rows, cols = torch.arange(num_tokens) // grid[1], torch.arange(num_tokens) % grid[1]
    cells_per_row = math.ceil(grid[1] / cell)
    cell_of = (rows / cell).floor().long() * cells_per_row + (cols / cell).floor().long()
    low, high = 0, count
    while low < high:
        mid = (low + high) // 2
        if mid + cell_of[ranked[mid:]].unique().numel() >= count:
            high = mid
        else:
            low = mid + 1
    kept = low
    pruned = ranked[kept:]
    cells, members = cell_of[pruned].unique(return_inverse=True)
    weights = scores[pruned].float().clamp_min(0)
    total = torch.zeros(cells.numel()).index_add_(0, members, weights)
    weights = torch.where(total[members] > 0, weights, 1.0)
    total = torch.zeros(cells.numel()).index_add_(0, members, weights)
    summed = torch.zeros(cells.numel(), tokens.shape[-1]).index_add_(0, members, tokens[pruned].float() * weights[:, None])
    first = torch.full((cells.numel(),), pruned.numel()).scatter_reduce_(0, members, torch.arange(pruned.numel()), reduce="amin")
    slots = pruned[first]
    size = torch.zeros(cells.numel()).index_add_(0, members, torch.ones_like(weights))
    values = torch.where(size[:, None] == 1, tokens[slots], (summed / total[:, None]).to(tokens.dtype))
    importance = scores[slots]
    if kept + cells.numel() > count:
        best = importance.argsort(descending=True, stable=True)[:count]
        slots, values, importance = slots[best], values[best], importance[best]
    keep = torch.cat([ranked[:kept], slots])
    order = keep.argsort()
    out_values = torch.cat([tokens[ranked[:kept]], values])[order]
    out_importance = torch.cat([scores[ranked[:kept]], importance])[order]
    return keep[order], out_values, out_importance, (torch.arange(keep.numel()) >= kept)[order]


@pytest.mark.parametrize("grid,cell", [((6, 6), 3.0), ((12, 12), 2.5), ((8, 12), 4.0), ((24, 24), 17.39 * 24 / 27)])
@pytest.mark.parametrize("kind", ["uniform", "ties", "zeros"])
def test_batched_recycling_equals_the_per_image_reference(grid, cell, kind):
    """Exactly: both add the same fp32 products into each cell in the same ranked order (the batch adds
    zeros for the kept tokens), one addition at a time, which no kernel reorders."""
    g = torch.Generator().manual_seed(grid[1])
    tokens_per_image = grid[0] * grid[1]
    scores = torch.rand(4, tokens_per_image, generator=g)
    if kind == "ties":
        scores = (scores * 3).floor()
    elif kind == "zeros":  # cells whose weights vanish are averaged uniformly
        scores = torch.where(scores < 0.8, 0.0, scores)
    tokens = torch.randn(4, tokens_per_image, 5, generator=g)
    for count in sorted({1, 2, 5, tokens_per_image // 4, tokens_per_image // 2, tokens_per_image - 1}):
        batched = recycle(scores, tokens, (grid,), count, cell)
        for i in range(4):
            for got, expected in zip(batched, recycle_one(scores[i], tokens[i], grid, count, cell)):
                assert torch.equal(got[i], expected), count


def test_random_draws_the_same_for_an_image_alone_in_a_batch_and_again():
    method = METHODS["random"](seed=5)
    tokens = torch.randn(3, 100, 4)
    first = method(prunevlm.Budget(10), image_tokens=tokens).keep
    assert torch.equal(first, method(prunevlm.Budget(10), image_tokens=tokens[1:2]).keep.expand(3, -1))
    assert torch.equal(first, method(prunevlm.Budget(10), image_tokens=tokens).keep)
    smaller = method(prunevlm.Budget(4), image_tokens=tokens[:1]).keep[0]
    assert set(smaller.tolist()) <= set(first[0].tolist())  # nested budgets
    assert not torch.equal(first, METHODS["random"](seed=6)(prunevlm.Budget(10), image_tokens=tokens).keep)


# -- the runtime ---------------------------------------------------------------------------------------

FAMILIES = {
    "llava": (tiny.llava, lambda: tiny.llava_inputs([2, 0, 2, 2]), [2, 0, 2, 2], 1),
    # two images of 4x8 patches, one of 8x8 and one of 4x4: three groups
    "qwen2_vl": (tiny.qwen2_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 8), (4, 4)], [(4, 8)]]), [1, 0, 2, 1], 3),
    "qwen2_5_vl": (tiny.qwen2_5_vl, lambda: tiny.qwen_inputs([[(4, 8)], [], [(8, 12), (4, 4)], [(4, 8)]]), [1, 0, 2, 1], 3),
}


class CallCounter:
    def __init__(self, method):
        self.calls, self.inner = [], method.select
        method.select = self

    def __call__(self, k, **signals):
        self.calls.append(signals["image_tokens"].shape[0])
        return self.inner(k, **signals)


@torch.no_grad()
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", OURS)
def test_the_batch_keeps_what_each_image_keeps_alone(name, method):
    """One method call per group of same-sized images, and each image's kept indices as when its row runs
    alone (each row alone is itself a batch of one or two images). Exactly: a row's signals differ between
    the two runs by rounding at most, which the methods' rounding to fp32 absorbs (docs/diversity.md, "Same
    result on every CPU"; but for a value at a rounding boundary), so a difference is a batching bug."""
    make, make_inputs, per_row, groups = FAMILIES[name]
    layers = 4 if method == "vflowopt" else 2
    model, inputs = make(layers=layers), make_inputs()
    budget = 0.4 if method == "vflowopt" else 3
    family = "llava" if name == "llava" else "qwen"
    with prunevlm.prune(model, method, budget=budget) as handle:
        counter = CallCounter(handle.method)
        model(**inputs)
        assert counter.calls and len(counter.calls) == groups and sum(counter.calls) == sum(per_row)
        batched = handle.stats.kept
        recycled = handle.stats.recycled
        seen = 0
        for i, count in enumerate(per_row):
            assert len(batched[i]) == count
            if not count:
                continue
            model(**tiny.row_inputs(inputs, i, seen, count, family))
            seen += count
            for in_batch, alone in zip(batched[i], handle.stats.kept[0]):
                assert torch.equal(in_batch, alone)
            for in_batch, alone in zip(recycled[i], handle.stats.recycled[0]):
                assert torch.equal(in_batch, alone)


# -- on the device ---------------------------------------------------------------------------------------


PRE_LLM = (*OURS, "divprune", "visionzip", "cdpruner")


@pytest.mark.parametrize("name", PRE_LLM)
def test_selection_reads_nothing_back_on_the_cpu(name):
    """Every torch operation of the CPU's path (the same as a GPU's except the diversity rounds, which run in
    NumPy on the CPU): none would synchronise a CUDA stream."""
    method = METHODS[name]()
    signals = taken_by(method, batch_signals(batch=3, side=24, dim=32))
    if "text_embeds" in signals:
        signals["text_mask"] = torch.arange(9)[None] < torch.tensor([[9], [0], [4]])
    expected = method(prunevlm.Budget(64), **signals).keep
    with NoHostReads():
        keep = method.select(64, **signals).keep
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("name", PRE_LLM)
def test_checking_the_signals_reads_back_once(name):
    """A call through the budget checks every signal and selects with one value read back: whether all the
    signals are finite."""
    method = METHODS[name]()
    signals = taken_by(method, batch_signals(batch=3, side=24, dim=32))
    with NoHostReads(allowed=1) as guard:
        method(prunevlm.Budget(64), **signals)
    assert guard.reads == 1


@pytest.mark.parametrize("name", PRE_LLM)
def test_the_gpu_path_runs_on_shapes_alone(name):
    """On a meta tensor (shape and dtype, no values) the path of every non-CPU device runs to the end: it
    reads no value back and sizes nothing by one, since either would fail there."""
    with pytest.raises(Exception):
        bool(torch.ones(2, device="meta").sum() > 1)
    method = METHODS[name]()
    signals = taken_by(method, batch_signals(batch=3, side=24, dim=32))
    signals = {key: value if key == "grid" else value.to("meta") for key, value in signals.items()}
    selection = method.select(64, **signals)
    assert selection.keep.shape == (3, 64) and selection.keep.device.type == "meta"


@pytest.mark.parametrize("schedule", ["fixed", "geometric"])
@pytest.mark.parametrize("ties", [False, True])
def test_device_rounds_equal_the_host_rounds_and_read_nothing_back(schedule, ties):
    """Exactly on any CPU: both read the same fp32 matrix and break ties by A's order."""
    g = torch.Generator().manual_seed(int(ties))
    features = torch.randn(4, 300, 16, generator=g)
    if ties:  # exact duplicates: every tie must fall the same way
        features = features[:, torch.randint(40, (300,), generator=g)]
    similarity = diversity.symmetric_gram(unit_rows(features))
    host = diversity.dense_rounds(similarity, 25, 8, schedule, 0.1)  # the CPU's NumPy rounds
    with NoHostReads():
        device = diversity.device_rounds(similarity, 25, 8, schedule, 0.1)
    assert torch.equal(device, host)


def test_the_guard_catches_a_read_back():
    with pytest.raises(HostReadError), NoHostReads():
        bool(torch.ones(2).sum() > 1)


def test_beyond_dense_tokens_only_the_cpu_takes_the_host_lists(monkeypatch):
    """On the CPU the neighbour lists (host rounds) serve residuals above DENSE_TOKENS; any other device
    keeps the dense batched rounds, which a meta tensor (shapes, no values) runs through to the end."""
    monkeypatch.setattr(diversity, "DENSE_TOKENS", 16)
    lists = []
    monkeypatch.setattr(diversity, "list_rounds", lambda *a, inner=diversity.list_rounds: lists.append(1) or inner(*a))
    features, order = torch.randn(2, 40, 8), torch.stack([torch.randperm(40) for _ in range(2)])
    diversity.bipartite_dedup(features, order, 10)
    assert len(lists) == 2  # one per image, on the host
    kept = diversity.bipartite_dedup(features.to("meta"), order.to("meta"), 10)
    assert kept.shape == (2, 10) and kept.device.type == "meta" and len(lists) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", PRE_LLM)
def test_selection_does_not_synchronise_on_cuda(name):
    method = METHODS[name]()
    signals = taken_by(method, batch_signals(batch=3, side=24, dim=32))
    cpu = method(prunevlm.Budget(64), **signals).keep
    signals = {key: value if key == "grid" else value.cuda() for key, value in signals.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep = method.select(64, **signals).keep
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert keep.shape == cpu.shape
    if name in ("random", "uniform"):
        assert torch.equal(keep.cpu(), cpu)


def test_bench_times_selection_per_image_at_each_batch_size():
    from prunevlm.bench.models import selection_signals
    from prunevlm.bench.report import selection_table
    from prunevlm.bench.timing import selection_per_image

    signals = selection_signals("tiny", 4, 10)
    rows = selection_per_image(signals, [*OURS, "fastv"], [64, 576], (1, 4), repeats=1, num_layers=4)
    # fastv chooses inside the LLM: only the pipeline times it
    assert [(r["method"], r["budget"]) for r in rows] == [(m, b) for m in OURS for b in (64, 576)]
    assert all(r["batch_1_ms_per_image"] > 0 and r["batch_4_ms_per_image"] > 0 for r in rows)
    text = selection_table(rows, [1, 4])
    assert text.count("\n") == len(rows) + 1 and "| flashvlm | 64 |" in text
