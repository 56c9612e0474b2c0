"""EVS (vLLM's efficient video sampling) on tensors: closed-form clips, exact counts, tie order, refusals
(docs/baselines.md, EVS); and on a tiny Qwen2.5-VL, the same choice from the tower's tokens."""

import pytest
import torch

import prunevlm
from prunevlm.budget import Budget
from prunevlm.methods.base import Refused
from prunevlm.methods.evs import EVS
from prunevlm.methods.uniform import grid_sample


def static_clip(frames: int, height: int, width: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """[1, t·h·w, dim]: one random frame repeated t times (nothing moves)."""
    frame = torch.randn(height * width, dim, generator=torch.Generator().manual_seed(seed))
    return frame.repeat(frames, 1)[None]


def reference(tokens: torch.Tensor, frames: tuple, k: int) -> torch.Tensor:
    """vLLM's rule written out for k >= h·w: 1 − cos to the previous frame (fp64), frame 1 above every other
    token, a stable descending sort, the first k, ascending."""
    t, h, w = frames
    x = tokens[0].double().view(t, h * w, -1)
    change = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1).float()
    change = torch.cat([torch.full((1, h * w), 255.0), change]).flatten()
    return change.argsort(descending=True, stable=True)[:k].sort().values


def test_a_static_clip_keeps_frame_one_then_the_earliest_positions():
    tokens = static_clip(4, 3, 3)
    keep = prunevlm.select("evs", 13, image_tokens=tokens, frames=(4, 3, 3)).keep
    # frame 1 whole (9), then nothing moved: exact ties go to the earlier frame, then the earlier position
    assert torch.equal(keep[0], torch.arange(13))


def test_a_token_that_changes_is_kept_wherever_it_is():
    tokens = static_clip(5, 4, 4)
    changed = 3 * 16 + 6  # frame 4, position 6
    tokens[0, changed] = torch.randn(8, generator=torch.Generator().manual_seed(1))
    keep = prunevlm.select("evs", 17, image_tokens=tokens, frames=(5, 4, 4)).keep[0]
    assert torch.equal(keep, torch.cat([torch.arange(16), torch.tensor([changed])]))
    # it differs from frame 3 and from frame 5: the token after it, same position, is the next one kept
    keep = prunevlm.select("evs", 18, image_tokens=tokens, frames=(5, 4, 4)).keep[0]
    assert torch.equal(keep[16:], torch.tensor([changed, changed + 16]))


def test_ties_go_to_the_earlier_frame_then_the_earlier_position():
    tokens = torch.zeros(1, 3 * 4, 8)
    tokens[..., 0] = 1  # every token e0 ...
    for position in (4 + 3, 8 + 1, 8 + 3):  # ... but these e1: orthogonal to what was there, except frame 3
        tokens[0, position] = torch.eye(8)[1]  # position 3, which stays e1 as in frame 2 (no change)
    keep = prunevlm.select("evs", 5, image_tokens=tokens, frames=(3, 2, 2)).keep[0]
    assert torch.equal(keep, torch.tensor([0, 1, 2, 3, 7]))  # frame 2 position 3 before frame 3 position 1
    later = prunevlm.select("evs", 6, image_tokens=tokens, frames=(3, 2, 2)).keep[0]
    assert torch.equal(later, torch.tensor([0, 1, 2, 3, 7, 9]))
    last = prunevlm.select("evs", 7, image_tokens=tokens, frames=(3, 2, 2)).keep[0]
    assert torch.equal(last, torch.tensor([0, 1, 2, 3, 4, 7, 9]))  # then the unchanged ones, by position


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [16, 17, 40, 95])
def test_per_clip_is_vllms_ranking_at_budgets_from_one_frame(seed, k):
    tokens = torch.randn(1, 6 * 16, 12, generator=torch.Generator().manual_seed(seed))
    keep = prunevlm.select("evs", k, image_tokens=tokens, frames=(6, 4, 4)).keep[0]
    assert torch.equal(keep, reference(tokens, (6, 4, 4), k))


def test_below_one_frame_the_first_frame_is_sampled_evenly():
    tokens = torch.randn(2, 4 * 36, 8, generator=torch.Generator().manual_seed(3))
    keep = prunevlm.select("evs", 9, image_tokens=tokens, frames=(4, 6, 6)).keep
    assert torch.equal(keep, grid_sample(6, 6, 9).expand(2, -1))


@pytest.mark.parametrize("budget,per_frame", [(5, 5), (16, 16), (40, 16), (0.25, 4), (0.5, 8)])
def test_per_frame_keeps_the_exact_count_in_every_frame(budget, per_frame):
    tokens = torch.randn(3, 5 * 16, 8, generator=torch.Generator().manual_seed(4))
    selection = EVS().select_frames(Budget(budget), image_tokens=tokens, frames=(5, 4, 4))
    keep = selection.keep
    assert keep.shape == (3, 5 * per_frame) and (keep.diff(dim=1) > 0).all()
    assert all((keep // 16 == frame).sum(dim=1).eq(per_frame).all() for frame in range(5))
    if per_frame < 16:
        assert torch.equal(keep[:, :per_frame], grid_sample(4, 4, per_frame).expand(3, -1))
        cosine = torch.nn.functional.cosine_similarity(tokens[:, 16:].double(), tokens[:, :-16].double(), dim=-1)
        for frame in range(1, 5):  # each later frame: its most changed tokens
            own = keep[:, frame * per_frame:(frame + 1) * per_frame] - 16 * frame
            lowest = cosine[:, (frame - 1) * 16:frame * 16].argsort(dim=1)[:, :per_frame].sort(dim=1).values
            assert torch.equal(own, lowest)


def test_per_frame_keeps_one_changed_token_per_frame_on_a_moving_dot():
    tokens = static_clip(4, 3, 3)
    for frame, position in enumerate((4, 5, 8, 7)):  # a dot moving over a static frame
        tokens[0, 9 * frame + position] = 10.0
    keep = EVS().select_frames(Budget(2), image_tokens=tokens, frames=(4, 3, 3)).keep[0]
    # frame 1: two of its tokens spread evenly; frame 2 on: where the dot left and where it arrived
    assert torch.equal(keep, torch.cat([grid_sample(3, 3, 2), torch.tensor([9 + 4, 9 + 5, 18 + 5, 18 + 8,
                                                                              27 + 7, 27 + 8])]))


def test_rounding_makes_the_choice_independent_of_the_summation_order():
    # near-duplicate tokens one ulp apart: summing the channels in another order must not reorder them
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 2 * 64, 256, generator=g)
    base[0, 64:] = base[0, :64] * (1 + torch.randint(0, 2, (64, 1), generator=g) * 2**-23)
    order = torch.randperm(256, generator=g)
    keep = prunevlm.select("evs", 80, image_tokens=base, frames=(2, 8, 8)).keep
    assert torch.equal(keep, prunevlm.select("evs", 80, image_tokens=base[..., order], frames=(2, 8, 8)).keep)


def test_full_budget_keeps_every_token_in_both_scopes():
    tokens = torch.randn(1, 3 * 4, 8)
    assert torch.equal(prunevlm.select("evs", 12, image_tokens=tokens, frames=(3, 2, 2)).keep[0], torch.arange(12))
    assert torch.equal(EVS().select_frames(Budget(1.0), image_tokens=tokens, frames=(3, 2, 2)).keep[0],
                       torch.arange(12))


def test_an_image_is_refused_with_a_message_that_says_evs_is_for_videos():
    with pytest.raises(Refused, match="video method.*another method"):
        prunevlm.select("evs", 4, image_tokens=torch.randn(1, 16, 8), grid=(4, 4))
    with pytest.raises(Refused, match="video method"):
        EVS().select_frames(Budget(4), image_tokens=torch.randn(1, 16, 8))


@pytest.mark.parametrize("frames,message", [((2, 4, 4), "hold 32 tokens but the signals have N=48"),
                                            ((3, 4), "three positive ints"), ((3, 0, 4), "three positive ints")])
def test_frames_that_do_not_hold_the_tokens_are_refused(frames, message):
    with pytest.raises(ValueError, match=message):
        prunevlm.select("evs", 4, image_tokens=torch.randn(1, 48, 8), frames=frames)


def test_evs_declares_itself_a_whole_clip_video_method():
    methods = {m["name"]: m for m in prunevlm.list_methods()}
    assert methods["evs"]["signals"] == ["image_tokens", "frames"] and EVS.whole_clip
    assert not any(cls.whole_clip for name, cls in prunevlm.methods.METHODS.items() if name != "evs")


@pytest.mark.parametrize("scope", ["per_frame", "per_clip"])
@torch.no_grad()
def test_on_a_model_evs_chooses_from_the_towers_tokens_as_on_tensors(scope):
    import tiny

    model = tiny.qwen2_5_vl(layers=2)
    inputs = tiny.qwen_video_inputs(model, [[(6, 8, 8)]])  # 6 frames of 4 x 4 merged tokens
    encoded = []
    hook = model.model.visual.register_forward_hook(lambda m, a, kw, out: encoded.append(out.pooler_output),
                                                    with_kwargs=True)
    budget = 5 if scope == "per_frame" else 20  # of 16 per frame; of 96 in the clip: frame 1 and 4 more
    try:
        with prunevlm.prune(model, "evs", budget, video_scope=scope) as handle:
            model.generate(**inputs, max_new_tokens=1, **tiny.GREEDY)
    finally:
        hook.remove()
    tokens, frames = encoded[-1][None], (6, 4, 4)
    expected = (EVS().select_frames(Budget(budget), image_tokens=tokens, frames=frames) if scope == "per_frame"
                else prunevlm.select("evs", budget, image_tokens=tokens, frames=frames)).keep[0]
    assert torch.equal(handle.stats.kept[0][0], expected)
