"""Properties of every method's choice on random inputs (hypothesis; `make fuzz` runs them at 10,000 examples):
the methods that select before the LLM through `select`, those that choose inside it through `choose`.
The three pre-LLM baselines have their own, with their permutation properties, in test_baselines.py."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import prunevlm
from prunevlm.methods import METHODS
from prunevlm.methods.sparsevlm import recycled_count

SELECTING = ["flashvlm", "vispruner", "vflowopt", "random", "uniform"]
CHOOSING = [name for name, cls in METHODS.items() if cls.llm_signals]
case = dict(batch=st.integers(1, 3), side=st.integers(2, 9), seed=st.integers(0, 2**16),
            budget=st.one_of(st.integers(1, 100), st.floats(0.01, 1.0)))


def kept_count(budget, tokens):
    return min(budget, tokens) if isinstance(budget, int) else min(tokens, max(1, round(budget * tokens)))


def selection_signals(batch: int, side: int, seed: int) -> dict:
    """Every signal of methods/base.py::SIGNALS, random, for a side x side grid of tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = side * side
    attention = torch.softmax(torch.randn(batch, tokens, tokens, generator=g) * 3, dim=-1)
    return {
        "image_tokens": torch.randn(batch, tokens, 12, generator=g),
        "features": torch.randn(batch, tokens, 8, generator=g),
        "saliency": torch.rand(batch, tokens, generator=g),
        "text_embeds": torch.randn(batch, 4, 12, generator=g),
        "attention": attention,
        "patches": torch.rand(batch, tokens, 3, 2, 2, generator=g) * 2 - 1,
        "grid": (side, side),
    }


@pytest.mark.property
@pytest.mark.parametrize("method", SELECTING)
@given(**case)
def test_select_keeps_an_exact_count_of_unique_ascending_indices_deterministically(method, batch, side, seed, budget):
    cls = METHODS[method]
    signals = {name: value for name, value in selection_signals(batch, side, seed).items()
               if name in cls.signals + cls.optional_signals}
    options = {"pixel_mean": (0.5,) * 3, "pixel_std": (0.5,) * 3} if method == "vflowopt" else {}
    first = prunevlm.select(method, budget, **signals, **options)
    tokens = side * side  # select() reads the budget as the count at the LLM input, for every method
    assert first.keep.shape == (batch, kept_count(budget, tokens))
    assert (first.keep.diff(dim=1) > 0).all() and (first.keep >= 0).all() and (first.keep < tokens).all()
    again = prunevlm.select(method, budget, **signals, **options)
    assert torch.equal(first.keep, again.keep)
    if first.tokens is not None:
        assert torch.equal(first.tokens, again.tokens) and torch.isfinite(first.tokens).all()


def llm_signals(length: int, seed: int) -> dict:
    """Every signal of methods/base.py::LLM_SIGNALS for one row of `length` positions (4 heads, width 16)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "last_attention": torch.softmax(torch.randn(4, length, generator=g) * 3, dim=-1),
        "prior_keys": torch.randn(length, 8, generator=g),
        "normed_input": torch.randn(length, 16, generator=g),
        "layer_queries": torch.randn(4, length, 4, generator=g),
        "layer_keys": torch.randn(4, length, 4, generator=g),
        "input": torch.randn(length, 16, generator=g),
        "embeddings": torch.randn(length, 16, generator=g),
    }


@pytest.mark.property
@pytest.mark.parametrize("method", CHOOSING)
@given(before=st.integers(1, 6), image=st.integers(2, 60), after=st.integers(0, 6), seed=st.integers(0, 2**16),
       share=st.floats(0.01, 0.99))
def test_choose_keeps_an_exact_count_of_unique_ascending_positions_deterministically(method, before, image, after,
                                                                                     seed, share):
    """A stage's choice for one image: `count` positions into its columns, unique, ascending, the same on a
    second call; recycled slots lie among them with weights that are convex combinations."""
    length = before + image + after
    columns = torch.arange(before, before + image)
    real = torch.ones(length, dtype=torch.bool)
    text = torch.ones(length, dtype=torch.bool)
    text[columns] = False
    count = max(1, round(share * image))
    cls = METHODS[method]
    signals = {name: value for name, value in llm_signals(length, seed).items() if name in cls.llm_signals}
    if method == "sparsevlm" and count < recycled_count(image):  # below what recycling alone makes
        with pytest.raises(ValueError, match="below what recycling alone makes"):
            cls().choose(0, count, columns, real, text, **signals)
        return
    first, again = (cls().choose(0, count, columns, real, text, **signals) for _ in range(2))
    positions = first[0] if isinstance(first, tuple) else first
    assert positions.shape == (count,) and (positions.diff() > 0).all()
    assert (positions >= 0).all() and (positions < image).all()
    repeat = again[0] if isinstance(again, tuple) else again
    assert torch.equal(positions, repeat)
    if isinstance(first, tuple):
        _, slots, weights = first
        assert torch.isin(slots, positions).all()
        assert torch.allclose(weights.sum(dim=-1), torch.ones(len(slots))) and (weights >= 0).all()


@pytest.mark.property
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
@given(image=st.integers(2, 60), seed=st.integers(0, 2**16), share=st.floats(0.01, 0.99))
def test_attention_ranked_choices_follow_a_permutation_of_the_image_keys(method, image, seed, share):
    """FastV and PyramidDrop rank by the attention each image position receives, nothing else: permuting the
    image's attention columns permutes the kept set. Exactly: a column's head mean, computed in fp64 and rounded
    to fp32 (docs/diversity.md, "Same result on every CPU"), does not depend on where the column sits."""
    length = image + 3
    columns = torch.arange(2, 2 + image)
    real, text = torch.ones(length, dtype=torch.bool), torch.ones(length, dtype=torch.bool)
    text[columns] = False
    count = max(1, round(share * image))
    attention = llm_signals(length, seed)["last_attention"]
    permutation = torch.randperm(image, generator=torch.Generator().manual_seed(seed))
    permuted = attention.clone()
    permuted[:, columns] = attention[:, columns[permutation]]
    method = METHODS[method]()
    kept = method.choose(0, count, columns, real, text, last_attention=attention)
    kept_permuted = method.choose(0, count, columns, real, text, last_attention=permuted)
    assert torch.equal(permutation[kept_permuted].sort().values, kept)


@pytest.mark.property
@given(frames=st.integers(1, 5), height=st.integers(1, 5), width=st.integers(1, 5), seed=st.integers(0, 2**16),
       budget=st.one_of(st.integers(1, 100), st.floats(0.01, 1.0)))
def test_evs_keeps_an_exact_count_per_clip_and_per_frame(frames, height, width, seed, budget):
    from prunevlm.methods.evs import EVS

    tokens = torch.randn(2, frames * height * width, 6, generator=torch.Generator().manual_seed(seed))
    layout = (frames, height, width)
    clip = prunevlm.select("evs", budget, image_tokens=tokens, frames=layout).keep
    assert clip.shape == (2, kept_count(budget, frames * height * width)) and (clip.diff(dim=1) > 0).all()
    per_frame = EVS().select_frames(prunevlm.Budget(budget), image_tokens=tokens, frames=layout).keep
    counts = torch.stack([torch.bincount(row // (height * width), minlength=frames) for row in per_frame])
    assert (counts == kept_count(budget, height * width)).all() and (per_frame.diff(dim=1) > 0).all()
