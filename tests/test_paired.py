"""The paired bootstrap behind eval's FlashVLM comparisons (prunevlm/bench/paired.py)."""

import numpy as np
import pytest

import prunevlm
from prunevlm.bench.paired import paired_difference


def test_equal_answers_differ_by_nothing_and_opposite_ones_by_everything():
    a = [1, 0, 1, 1, 0, 1]
    groups = [0, 0, 1, 1, 2, 2]
    same = paired_difference(a, a, groups)
    assert (same["difference"], same["low"], same["high"]) == (0, 0, 0)
    full = paired_difference([1] * 6, [0] * 6, groups)
    assert (full["difference"], full["low"], full["high"]) == (1, 1, 1)
    assert full["questions"] == 6 and full["groups"] == 3


def test_matches_a_plain_loop_over_the_same_draws():
    """The vectorised resampling equals resampling image by image: each draw takes whole images, and the
    difference is over the questions of the drawn images."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), rng.integers(1, 7, size=30))
    groups = rng.permutation(groups)  # questions of one image need not be adjacent
    a, b = rng.integers(0, 2, len(groups)), rng.integers(0, 2, len(groups))
    got = paired_difference(a, b, list(groups), resamples=500, seed=3)
    draws = np.random.default_rng(3).integers(0, 30, size=(500, 30))
    loop = []
    for draw in draws:
        picked = np.concatenate([np.flatnonzero(groups == g) for g in draw])
        loop.append((a[picked].sum() - b[picked].sum()) / len(picked))
    low, high = np.percentile(loop, [2.5, 97.5])
    assert got["low"] == pytest.approx(low) and got["high"] == pytest.approx(high)
    assert got["difference"] == pytest.approx((a.sum() - b.sum()) / len(a))


def test_the_interval_narrows_with_more_images_and_covers_a_true_difference():
    rng = np.random.default_rng(0)
    widths, covered = [], 0
    for images in (50, 800):
        truth = rng.random(images * 3) < 0.7
        a = truth | (rng.random(images * 3) < 0.1)  # a gets 10 % of b's misses right as well
        result = paired_difference(a, truth, np.repeat(np.arange(images), 3), resamples=2000)
        widths.append(result["high"] - result["low"])
        covered += result["low"] <= 0.3 * 0.1 <= result["high"]
    assert widths[1] < widths[0] / 2 and covered == 2


@pytest.mark.parametrize("a, b, groups", [([1, 0], [1], [0, 1]), ([1, 0], [1, 0], [0]), ([], [], [])])
def test_mismatched_answers_are_refused(a, b, groups):
    with pytest.raises(prunevlm.InvalidInput, match="equal-length"):
        paired_difference(a, b, groups)
