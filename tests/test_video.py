"""Video through the same handle (#27; docs/models.md §7): Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision,
per_frame and per_clip, on tiny random models with two videos of different frame counts and sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import prunevlm
from prunevlm.budget import Budget
from prunevlm.errors import InvalidBudget, Unsupported
from prunevlm.methods.base import Method, Refused, Selection
import tiny
from prunevlm.models import get_adapter
from prunevlm.viz import draw_tokens, fit, model_view
from test_viz import Processor, find

METHODS = ["flashvlm", "vispruner", "uniform", "random", "vflowopt"]
SCOPES = ["per_frame", "per_clip"]
BUILD = {"qwen2_5_vl": tiny.qwen2_5_vl, "qwen2_vl": tiny.qwen2_vl, "qwen3_vl": tiny.qwen3_vl,
         "llava_onevision": tiny.llava_onevision}
# Qwen, row 0: two videos (3 temporal patches of 2x2 merged tokens, 2 of 2x3) with an image between them;
# OneVision, row 0: two videos of 3 frames (every frame resized to 2x2 tokens, one newline after each video).
# Row 1: an image; row 2: text only.
ROWS = {"qwen": [[(3, 4, 4), (4, 4), (2, 4, 6)], [(4, 6)], []], "llava_onevision": [["video", "video"], [(30, 50)], []]}
FRAMES = {"qwen": [(3, 2, 2), (2, 2, 3)], "llava_onevision": [(3, 2, 2), (3, 2, 2)]}  # row 0's videos: (t, h, w)


@pytest.fixture(scope="module", params=list(BUILD))
def family(request):
    return request.param, BUILD[request.param]()


def kind(name: str) -> str:
    return "llava_onevision" if name == "llava_onevision" else "qwen"


def make_inputs(name: str, model, rows=None, seed: int = 0, frames: int = 3) -> dict:
    rows = ROWS[kind(name)] if rows is None else rows
    if name == "llava_onevision":
        return tiny.onevision_video_inputs(model, rows, frames, seed=seed)
    return tiny.qwen_video_inputs(model, rows, seed=seed)


def visual_ids(model) -> tuple[int, int]:
    return model.config.image_token_id, model.config.video_token_id


def options(name: str, method: str) -> dict:
    # Qwen3-VL adds DeepStack features at LLM layers 0 and 1: an in-LLM stage starts at 2 or later
    return {"layers": (2, 3)} if method == "vflowopt" and name == "qwen3_vl" else {}


class LanguageModelInputs:
    """The keyword arguments the language model receives at each call (after the handle's hook, if any)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_full_budget_is_the_unhooked_model_and_remove_restores_it(family, method, scope):
    name, model = family
    inputs = make_inputs(name, model)
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, **tiny.GREEDY)
    with prunevlm.prune(model, method, 1.0, video_scope=scope, **options(name, method)) as handle:
        torch.testing.assert_close(model(**inputs).logits, logits, atol=0, rtol=0)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, **tiny.GREEDY), generated)
        assert handle.stats.tokens_after == handle.stats.tokens_before
    torch.testing.assert_close(model(**inputs).logits, logits, atol=0, rtol=0)


def expected_kept(budget: Budget, scope: str, frames) -> list[list[int]]:
    """Per video, its kept tokens per frame (per_frame) or [its total] (per_clip)."""
    if scope == "per_frame":
        return [[budget.tokens_to_keep(h * w)] * t for t, h, w in frames]
    return [[budget.tokens_to_keep(t * h * w)] for t, h, w in frames]


@pytest.mark.parametrize("budget", [2, 0.3])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method", ["flashvlm", "vispruner", "uniform", "random"])
@torch.no_grad()
def test_llm_input_is_the_text_and_the_exact_kept_count(family, method, scope, budget):
    """Every video keeps exactly its count per frame (per_frame) or over the clip (per_clip), plus
    OneVision's trailing newline; the images beside it keep what the image rules give. OneVision's videos of
    one call share a frame count: a prompt of 2 frames runs too, so its videos differ in frames as Qwen's do."""
    name, model = family
    budget = Budget(budget)
    cases = [(None, FRAMES[kind(name)])]
    if name == "llava_onevision":
        cases.append(([["video"]], [(2, 2, 2)]))
    newline = int(name == "llava_onevision")
    for rows, frames in cases:
        inputs = make_inputs(name, model, rows, frames=frames[0][0])
        ids = inputs["input_ids"]
        visual = torch.isin(ids, torch.tensor(visual_ids(model)))
        text = (~visual & inputs["attention_mask"].bool()).sum(dim=1)
        with prunevlm.prune(model, method, budget, video_scope=scope) as handle, LanguageModelInputs(model) as seen:
            model(**inputs)
        stats = handle.stats
        videos = [(i, video) for i, video in enumerate(stats.videos[0]) if video is not None]
        assert len(videos) == len(frames)
        for (i, video), counts, (t, h, w) in zip(videos, expected_kept(budget, scope, frames), frames):
            assert (video.frames, video.before, video.scope) == (t, [h * w] * t, scope)
            assert video.after == counts if scope == "per_frame" else sum(video.after) == counts[0]
            assert stats.tokens_after[0][i] == sum(counts) + newline
        real = seen.calls[0]["attention_mask"].sum(dim=1)
        assert real.tolist() == [int(n) + sum(row) for n, row in zip(text, stats.tokens_after)] == stats.prefill_after


@pytest.mark.parametrize("scope", SCOPES)
@torch.no_grad()
def test_in_llm_budget_is_the_layer_average_over_the_videos_tokens(family, scope):
    name, model = family
    inputs = make_inputs(name, model, ROWS[kind(name)][:1])
    chosen = options(name, "vflowopt")
    with prunevlm.prune(model, "vflowopt", 0.5, video_scope=scope, **chosen) as handle:
        model.generate(**inputs, max_new_tokens=2, **tiny.GREEDY)
    method = prunevlm.api.make_method("vflowopt", **chosen)
    layers = len(model.model.language_model.layers)
    videos = [i for i, video in enumerate(handle.stats.videos[0]) if video is not None]
    for index, (t, h, w) in zip(videos, FRAMES[kind(name)]):
        plan = handle.stats.stages[0][index]
        assert plan == method.plan(Budget(0.5), t * h * w, layers)
        video = handle.stats.videos[0][index]
        assert sum(video.after) == plan.counts[0]
        if scope == "per_frame":  # the first count shared evenly by the frames
            assert max(video.after) - min(video.after) <= 1


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_kept_tokens_keep_their_positions_and_every_text_token_stays(family, method, scope):
    """Positions (Qwen: the M-RoPE ids, temporal, h, w) of each kept token as in the unpruned prompt; every
    text token kept (Qwen3-VL's timestamps and each frame's vision start/end); OneVision's trailing video
    newline kept; DeepStack rows follow the kept visual tokens."""
    name, model = family
    inputs = make_inputs(name, model)
    with LanguageModelInputs(model) as seen:
        model(**inputs)
    full = seen.calls[0]
    with prunevlm.prune(model, method, 2 if method != "vflowopt" else 0.3, video_scope=scope,
                        **options(name, method)) as handle, LanguageModelInputs(model) as seen:
        model(**inputs)
    pruned, columns = seen.calls[0], handle.stats.input_columns
    ids = inputs["input_ids"]
    for row in range(ids.shape[0]):
        real = pruned["attention_mask"][row].bool()
        kept = columns[row][real]
        visual = torch.isin(ids[row], torch.tensor(visual_ids(model)))
        text = torch.nonzero(inputs["attention_mask"][row].bool() & ~visual).flatten()
        assert set(text.tolist()) <= set(kept.tolist())
        if full["position_ids"] is None:  # 1D positions the model counts: the kept columns'
            assert torch.equal(pruned["position_ids"][row][real], kept)
        else:
            assert torch.equal(pruned["position_ids"][:, row][:, real], full["position_ids"][:, row][:, kept])
    if name == "llava_onevision":  # each video's last placeholder, its newline, is kept
        video = torch.nonzero(ids[0] == model.config.video_token_id).flatten()
        assert set(video.view(2, -1)[:, -1].tolist()) <= set(columns[0].tolist())
    if name == "qwen3_vl":
        flat = (columns.clamp_min(0) + ids.shape[1] * torch.arange(ids.shape[0])[:, None])[pruned["attention_mask"].bool()]
        visual = full["visual_pos_masks"].flatten()
        assert torch.equal(pruned["visual_pos_masks"][pruned["attention_mask"].bool()], visual[flat])
        rank = torch.cumsum(visual.long(), 0) - 1
        rows = rank[flat][visual[flat]]
        for level, original in zip(pruned["deepstack_visual_embeds"], full["deepstack_visual_embeds"]):
            assert torch.equal(level, original[rows])


@pytest.mark.parametrize("scope", SCOPES)
@torch.no_grad()
def test_a_padded_batch_of_a_video_row_an_image_row_and_a_text_row_equals_the_rows_alone(family, scope):
    name, model = family
    inputs = make_inputs(name, model)
    singles = [make_inputs(name, model, [items], seed=row) for row, items in enumerate(ROWS[kind(name)])]
    with prunevlm.prune(model, "flashvlm", 2, video_scope=scope):
        tiny.assert_batch_equals_rows(model, inputs, singles, max_new_tokens=4, **tiny.GREEDY)


@torch.no_grad()
def test_sampling_and_beam_search(family):
    """At full budget both equal the unhooked model (the encoded videos are repeated per beam or sample and
    found again); at a budget every repeated prompt is pruned to the same length."""
    name, model = family
    inputs = make_inputs(name, model, ROWS[kind(name)][:2])
    modes = [dict(do_sample=True, num_return_sequences=2), dict(num_beams=2, do_sample=False)]
    suppress = dict(max_new_tokens=3, suppress_tokens=tiny.GREEDY["suppress_tokens"])
    for mode in modes:
        torch.manual_seed(0)
        unhooked = model.generate(**inputs, **mode, **suppress)
        with prunevlm.prune(model, "flashvlm", 1.0):
            torch.manual_seed(0)
            assert torch.equal(model.generate(**inputs, **mode, **suppress), unhooked)
        with prunevlm.prune(model, "flashvlm", 2, video_scope="per_clip") as handle:
            model.generate(**inputs, **mode, **suppress)
        after = handle.stats.prefill_after
        assert len(after) == 4 and after[0] == after[1] and after[2] == after[3] and after[0] < inputs["attention_mask"][0].sum()


@dataclass
class FramesOnly(Method):
    """A video-only method: the first token of every frame (asks for the signal 'frames')."""

    name: ClassVar[str] = "frames_only"
    description: ClassVar[str] = "test: the first token of each frame"
    signals: ClassVar[tuple[str, ...]] = ("image_tokens", "frames")

    def select(self, k, image_tokens, frames) -> Selection:
        t, h, w = frames
        return Selection(keep=(torch.arange(t) * h * w)[:k].expand(image_tokens.shape[0], -1).clone())


@torch.no_grad()
def test_frames_are_given_to_videos_and_a_video_method_is_refused_on_images():
    model = tiny.qwen2_5_vl()
    video = tiny.qwen_video_inputs(model, [[(3, 4, 4)]])
    with prunevlm.prune(model, FramesOnly(), 3, video_scope="per_clip") as handle:
        model(**video)
        assert handle.stats.kept[0][0].tolist() == [0, 4, 8]
        with pytest.raises(Refused, match="videos only"):
            model(**tiny.qwen_video_inputs(model, [[(4, 4)]]))


def test_bad_inputs_are_refused():
    model = tiny.qwen2_vl()
    with pytest.raises(InvalidBudget, match="video_scope"):
        prunevlm.prune(model, "flashvlm", 2, video_scope="per_video")
    inputs = tiny.qwen_video_inputs(model, [[(2, 4, 4)]])
    inputs["input_ids"][inputs["input_ids"] == tiny.QWEN_VIDEO] = tiny.QWEN_IMAGE
    with prunevlm.prune(model, "flashvlm", 2), pytest.raises(ValueError, match="video placeholders do not match"):
        model(**inputs)
    for build in (tiny.llava, tiny.llava_next):
        model = build()
        inputs = tiny.llava_inputs([1])
        inputs["pixel_values_videos"] = inputs["pixel_values"][:, None]
        with prunevlm.prune(model, "random", 4), pytest.raises(Unsupported, match="not on llava"):
            model(**inputs)


@pytest.mark.parametrize("build", [tiny.qwen2_vl, tiny.llava_onevision])
def test_draw_shows_each_frame_beside_its_kept_tokens(build):
    """A film strip: every frame (black, grey, white) as the tower saw it, and beside it the same frame with
    exactly the tokens it kept in the clip."""
    model = build()
    if build is tiny.llava_onevision:
        inputs = tiny.onevision_video_inputs(model, [["video"]], frames=3)
        shades = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1, 1)
    else:
        inputs = tiny.qwen_video_inputs(model, [[(3, 4, 4)]])
        shades = torch.tensor([-1.0, 0.0, 1.0]).repeat_interleave(16)[:, None]  # 16 patches per frame
    inputs["pixel_values_videos"] = shades.expand_as(inputs["pixel_values_videos"]).clone()
    with prunevlm.prune(model, "random", 5, video_scope="per_clip") as handle:
        model(**inputs)
        sheet = handle.draw(inputs, Processor)
    ((frames, grid),) = get_adapter(model).video_views(inputs)
    kept, size = handle.stats.kept[0][0], grid[0] * grid[1]
    assert len(frames) == 3
    for number, frame in enumerate(frames):
        seen = fit(model_view(frame, (0.5,) * 3, (0.5,) * 3), grid)
        on = kept[kept // size == number] % size
        assert find(sheet, seen) and find(sheet, draw_tokens(seen, grid, on))


@pytest.mark.parametrize("build", [tiny.qwen2_5_vl, tiny.llava_onevision])
@torch.no_grad()
def test_every_method_prunes_a_video_in_both_scopes(build):
    """Every registered method at 0.5: the pre-LLM ones keep half of each frame (per_frame) or of the clip
    (per_clip); those with in-LLM stages plan over the clip's tokens, the layer average of the budget."""
    from prunevlm.methods import METHODS, make_method

    model = build(layers=4)
    if build is tiny.llava_onevision:
        inputs, (t, h, w) = tiny.onevision_video_inputs(model, [["video"]], frames=3), (3, 2, 2)
    else:
        inputs, (t, h, w) = tiny.qwen_video_inputs(model, [[(3, 4, 4)]]), (3, 2, 2)
    budget = Budget(0.5)
    for name in METHODS:
        for scope in SCOPES:
            with prunevlm.prune(model, name, budget, video_scope=scope) as handle:
                model.generate(**inputs, max_new_tokens=2, **tiny.GREEDY)
            (video,) = handle.stats.videos[0]
            if make_method(name).prunes_in_llm:
                assert handle.stats.stages[0][0] == make_method(name).plan(budget, t * h * w, 4)
            elif scope == "per_frame":
                assert video.after == [budget.tokens_to_keep(h * w)] * t
            else:
                assert sum(video.after) == budget.tokens_to_keep(t * h * w)


@pytest.mark.parametrize("name", list(BUILD)[:3])
@torch.no_grad()
def test_qwen_video_signals_are_each_frames_own(name):
    """The tower attends within each temporal patch: a video's tokens and its saliency, keys and attention
    (block-diagonal) are those of its frames encoded as images of the same pixels, in time order."""
    from prunevlm.models.base import Capture

    model = BUILD[name]()
    inputs = tiny.qwen_video_inputs(model, [[(3, 4, 4)]])
    adapter, capture = get_adapter(model), Capture()
    handles = adapter.install({"saliency", "keys", "attention"}, capture)
    try:
        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        model.model.get_image_features(inputs["pixel_values_videos"], torch.tensor([[1, 4, 4]] * 3))
    finally:
        for handle in handles:
            handle.remove()
    video, images = capture.calls
    assert video["frames"] == [(3, 2, 2)] and images["frames"] == [(1, 2, 2)] * 3
    for signal in ("tokens", "saliency", "keys"):
        torch.testing.assert_close(video[signal][0], torch.cat(images[signal]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(video["attention"][0], torch.block_diag(*images["attention"]), atol=1e-6, rtol=1e-5)
