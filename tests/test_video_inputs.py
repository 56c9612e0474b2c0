"""Video around the core (#27 item 2): configs carry video_scope, `generate --video/--video-scope/--video-frames`,
the lmms-eval model_args, decoding a folder of frames or a video file, and video rows in prompt_inputs."""

import json
import re
import sys
import types

import pytest
import torch
from PIL import Image

import prunevlm
from prunevlm.cli import build_parser, check, main
from prunevlm.config import FORMAT, load_config, save_config
from prunevlm.errors import InvalidConfig, InvalidInput, InvalidSetting
from prunevlm.api import resolve
from prunevlm.generate import pruning_settings
from prunevlm.lmms_eval.harness import PrunedModel, parse_model_args
from prunevlm.loading import evenly, frame_files, prompt_inputs, read_video

DEMO = prunevlm.DEMO_MODEL


def frames_folder(path, count: int, size=(20, 16)):
    """`count` frames named frame_1.png ... frame_<count>.png, frame i filled with grey level 10·i."""
    path.mkdir(exist_ok=True)
    for i in range(1, count + 1):
        Image.new("RGB", size, (10 * i,) * 3).save(path / f"frame_{i}.png")
    return path


def test_configs_save_and_load_the_video_scope(tmp_path):
    path = tmp_path / "c.json"
    save_config(str(path), "flashvlm", 64, {}, video_scope="per_clip")
    assert load_config(str(path))["video_scope"] == "per_clip"
    save_config(str(path), "flashvlm", 64, {})
    assert load_config(str(path))["video_scope"] == "per_frame"
    # a config from before the option: per_frame
    assert load_config({"format": FORMAT, "method": "flashvlm", "budget": 64, "options": {}})["video_scope"] == "per_frame"
    with pytest.raises(InvalidConfig, match="pruning config: video_scope must be 'per_frame'.*got 'clip'"):
        load_config({"format": FORMAT, "method": "flashvlm", "budget": 64, "video_scope": "clip", "options": {}})
    with pytest.raises(ValueError, match="video_scope must be 'per_frame'"):
        save_config(str(path), "flashvlm", 64, {}, video_scope="frame")


def test_frames_of_a_folder_come_in_numeric_name_order_and_are_sampled_evenly(tmp_path):
    folder = frames_folder(tmp_path / "clip", 12)
    (folder / "notes.txt").write_text("not a frame")
    assert [p.name for p in frame_files(folder)][:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert evenly(12, 4) == [1, 4, 7, 10] and evenly(3, 8) == [0, 1, 2]
    video = read_video(folder, 4)
    assert [frame.getpixel((0, 0))[0] for frame in video] == [20, 50, 80, 110]  # frames 2, 5, 8, 11
    assert len(read_video(folder, 40)) == 12  # fewer frames than asked: all of them


def test_bad_video_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="holds no frame images"):
        read_video(tmp_path / "empty")
    folder = frames_folder(tmp_path / "mixed", 3)
    Image.new("RGB", (8, 8)).save(folder / "frame_4.png")
    with pytest.raises(InvalidInput, match=r"differ in size \[\(8, 8\), \(20, 16\)\]"):
        read_video(folder)


def test_a_video_file_is_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_image(Image.new("RGB", (32, 24), (25 * i,) * 3))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    video = read_video(path, 5)
    assert len(video) == 5 and video[0].size == (32, 24) and video[0].mode == "RGB"
    levels = [frame.getpixel((16, 12))[0] for frame in video]  # frames 1, 3, 5, 7, 9 (lossy, hence the margin)
    assert all(abs(level - 25 * i) <= 8 for level, i in zip(levels, (1, 3, 5, 7, 9)))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(InvalidInput, match="cannot decode the video"):
        read_video(tmp_path / "broken.mp4")


def test_a_video_file_without_pyav_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(InvalidSetting, match=r"needs PyAV: pip install 'prunevlm\[video\]' \(or give a folder"):
        read_video(tmp_path / "clip.mp4")


class RecordingProcessor:
    """What prompt_inputs hands a processor: no chat template, so the placeholders are written out."""
    image_token, video_token, chat_template = "<image>", "<video>", None
    tokenizer = types.SimpleNamespace(padding_side="right")

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return types.SimpleNamespace(to=lambda device: kwargs)


def test_prompt_inputs_places_videos_after_the_images_of_their_row():
    processor, image, clip = RecordingProcessor(), Image.new("RGB", (4, 4)), [Image.new("RGB", (4, 4))] * 3
    prompt_inputs(processor, [[image], None, None], ["a", "b", "c"], "cpu", [[clip], [clip, clip], None])
    assert processor.kwargs["text"] == ["<image>\n<video>\na", "<video>\n<video>\nb", "c"]
    assert processor.kwargs["images"] == [image] and processor.kwargs["videos"] == [clip] * 3
    prompt_inputs(processor, [[image]], ["a"], "cpu")
    assert "videos" not in processor.kwargs  # image-only processors take no videos argument
    with pytest.raises(InvalidInput, match="contains the video placeholder '<video>'.*\\(0 and 1 here\\)"):
        prompt_inputs(processor, [None], ["<video> what?"], "cpu", [[clip]])


def parse(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(argv)
    check(args, parser)
    return args


def video_scope(args) -> str:
    """The video scope generate hands prune(): --video-scope, else the config's, else per_frame (resolve())."""
    method, budget, options, config = pruning_settings(args)
    return resolve(method, budget, config, options, args.budget_scope, args.video_scope)[3]


def test_generate_takes_videos_their_frames_and_scope(tmp_path):
    folder = str(frames_folder(tmp_path / "clip", 4))
    args = parse(["generate", "--model", "llava-hf/m", "--video", folder, "--video", folder, "--prompt", "p",
                  "--video-scope", "per_clip", "--video-frames", "8"])
    assert args.video == [folder, folder] and args.video_frames == 8 and video_scope(args) == "per_clip"
    args = parse(["generate", "--model", "llava-hf/m", "--video", folder, "--prompt", "p"])
    assert args.video_frames == 16 and video_scope(args) == "per_frame"
    assert video_scope(parse(["generate", "--model", "llava-hf/m", "--image", folder + "/frame_1.png",
                              "--prompt", "p"])) == "per_frame"  # no video: the default, which counts on nothing


def test_generate_takes_the_video_scope_of_a_config(tmp_path):
    folder, config = str(frames_folder(tmp_path / "clip", 2)), tmp_path / "c.json"
    save_config(str(config), "flashvlm", 64, {}, video_scope="per_clip")
    args = parse(["generate", "--model", "llava-hf/m", "--video", folder, "--prompt", "p", "--config", str(config)])
    assert video_scope(args) == "per_clip"


@pytest.mark.parametrize("argv,message", [
    (["--video", "missing.mp4", "--prompt", "p"], "argument --video: no video file or folder of frames 'missing.mp4'"),
    (["--video", "EMPTY", "--prompt", "p"], "argument --video: the video folder .* holds no frame images"),
    (["--video", "CLIP", "--prompt", "p", "--video-scope", "clip"], "argument --video-scope: invalid choice: 'clip'"),
    (["--prompt", "p", "--video-scope", "per_clip"], "--video-scope says how the budget counts on a video; give --video"),
    (["--video", "CLIP", "--prompt", "p", "--method", "none", "--video-scope", "per_clip"],
     "--method none runs the unpruned model, so --video-scope would do nothing"),
    (["--video", "CLIP", "--jsonl", "ROWS"], "give --jsonl, or --image/--video/--prompt, not both"),
    (["--video", "CLIP", "--prompt", "p", "--video-frames", "0"], "argument --video-frames: must be an int >= 1"),
])
def test_generate_refuses_bad_video_flags(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "rows.jsonl").write_text('{"image": null, "prompt": "p"}\n')
    places = {"EMPTY": str(tmp_path / "empty"), "CLIP": str(frames_folder(tmp_path / "clip", 2)),
              "ROWS": str(tmp_path / "rows.jsonl")}
    with pytest.raises(SystemExit):
        main(["generate", "--model", "llava-hf/m", *[places.get(a, a) for a in argv]])
    assert re.search(message, capsys.readouterr().err)


def test_lmms_eval_takes_the_video_scope_and_frames():
    settings = parse_model_args({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "video_scope": "per_clip",
                                 "video_frames": 8})
    assert settings.video_scope == "per_clip" and settings.video_frames == 8
    settings = parse_model_args({"pretrained": DEMO, "method": "flashvlm", "budget": 16})
    assert settings.video_scope == "per_frame" and settings.video_frames == 16  # prune()'s default scope
    assert parse_model_args({"pretrained": DEMO, "method": "vflowopt",
                             "config": prunevlm.DEMO_CONFIGS[0.25]}).video_scope == "per_frame"


@pytest.mark.parametrize("args,message", [
    ({"video_scope": "clip"}, "video_scope must be 'per_frame'"),
    ({"video_frames": 0}, "video_frames must be an int >= 1"),
    ({"video_frames": "8"}, "video_frames must be an int >= 1"),
    ({"method": "none", "budget": None, "video_scope": "per_clip"}, "method=none is the unpruned model: drop video_scope"),
    ({"method": "vflowopt", "budget": None, "config": "DEMO_CONFIG", "video_scope": "per_clip"},
     "calibrated with video_scope='per_frame'"),
])
def test_lmms_eval_refuses_bad_video_args(args, message):
    given = {"pretrained": DEMO, "method": "flashvlm", "budget": 16, **args}
    given = {k: prunevlm.DEMO_CONFIGS[0.25] if v == "DEMO_CONFIG" else v for k, v in given.items() if v is not None}
    with pytest.raises((ValueError, TypeError), match=message):
        parse_model_args(given)


def test_lmms_eval_rows_decode_their_video_paths_after_their_images(tmp_path, monkeypatch):
    import prunevlm.lmms_eval.harness as harness

    folder, image = str(frames_folder(tmp_path / "clip", 6)), Image.new("RGB", (4, 4))
    handed = {}
    monkeypatch.setattr(harness, "prompt_inputs", lambda processor, images, texts, device, videos:
                        handed.update(images=images, videos=videos) or {})
    pruned = PrunedModel.__new__(PrunedModel)
    pruned.settings, pruned.processor = parse_model_args({"pretrained": DEMO, "method": "none", "video_frames": 3}), None
    pruned.model = types.SimpleNamespace(device="cpu", dtype=torch.float32)
    pruned._inputs([[image, folder], None, [folder]], ["a", "b", "c"])
    assert handed["images"] == [[image], None, None]
    assert [None if v is None else [len(clip) for clip in v] for v in handed["videos"]] == [[3], None, [3]]


@pytest.mark.parametrize("family,frames,tokens", [("qwen2_5vl", 2, 256), ("qwen2_5vl", 6, 3 * 256),
                                                  ("onevision", 3, 3 * 196 + 1)])
def test_bench_video_prompts_hold_the_placeholders_the_stock_model_fills(family, frames, tokens):
    from prunevlm.bench.models import build_family, video_inputs

    model = build_family(family, "tiny", torch.float32, torch.device("cpu"))
    inputs = video_inputs(family, model, 10, frames, torch.device("cpu"))
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == tokens
    with torch.no_grad():  # the stock forward checks that the video's features fill its placeholders
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_bench_runs_videos_of_each_frame_count_in_both_scopes(tmp_path):
    """Every configuration in both scopes, but those the scope cannot change (the unpruned model, an in-LLM
    method at a fraction) once; --decode-tokens 0 skips the decoding run."""
    out = tmp_path / "bench.json"
    main(["bench", "--model-family", "qwen2_5vl", "--shape", "tiny", "--video-frames", "2,4", "--methods",
          "none,uniform,fastv", "--budgets", "0.5,64", "--repeats", "1", "--decode-tokens", "0",
          "--diversity-tokens", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {(r["frames"], r["video_scope"], r["method"], r["budget"]): r for r in report["rows"]}
    scoped = {(frames, scope, method, budget) for frames in (2, 4) for scope in ("per_frame", "per_clip")
              for method, budget in [("uniform", 0.5), ("uniform", 64), ("fastv", 64)]}
    once = {(frames, "per_frame", method, budget) for frames in (2, 4) for method, budget in [("none", None), ("fastv", 0.5)]}
    assert set(rows) == scoped | once
    assert rows[(2, "per_frame", "none", None)]["kept"] == 256 and rows[(4, "per_frame", "none", None)]["kept"] == 512
    assert all(r["decode_ms"] is None for r in rows.values() if "refused" not in r)
    table = (tmp_path / "bench.md").read_text()
    header = next(i for i, line in enumerate(table.splitlines()) if line.startswith("| frames |"))
    assert [line.count("|") for line in table.splitlines()[header:header + 3]] == [16, 16, 16]  # header, rule, a row: 15 cells
    assert report["video_frames"] == [2, 4] and "| 4 | - | none | all | 512 |" in table
    # an int counts per frame in one scope and per video in the other: both tried (out of reach here)
    assert "| 4 | - | fastv | 0.5 |" in table and "fastv at 64 (4 frames, per_clip) refused" in table
    saved = rows[(4, "per_clip", "uniform", 0.5)]
    share = 100 * saved["selection_ms"] / (rows[(4, "per_frame", "none", None)]["prefill_ms"] - saved["prefill_ms"])
    assert re.search(rf"\| 4 \| per_clip \| uniform \| 0\.5 \|.*\| {share:.1f} % \| - \|", table)


@pytest.mark.parametrize("argv,message", [
    (["--video-frames", "8"], "--video-frames runs on --model-family qwen2_5vl or onevision, not llava"),
    (["--model-family", "qwen2_5vl", "--video-frames", "8,3"], r"give even frame counts, got \[3\]"),
    (["--model-family", "onevision", "--video-frames", ","], "give at least one frame count"),
    (["--model-family", "onevision", "--video-frames", "8,x"], "must be an int >= 1, got 'x'"),
])
def test_bench_refuses_bad_video_frames(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["bench", *argv])
    assert re.search(message, capsys.readouterr().err)


def test_the_cli_knows_the_video_bench_families_without_importing_torch():
    from prunevlm.bench.models import VIDEO_FAMILIES
    from prunevlm.cli import VIDEO_BENCH_FAMILIES

    assert set(VIDEO_BENCH_FAMILIES) == set(VIDEO_FAMILIES)


def test_prune_takes_the_video_scope_of_a_config(tmp_path):
    """prune(config=...) counts videos as the config says, and refuses another scope given beside it."""
    import tiny

    path = tmp_path / "clip.json"
    save_config(str(path), "flashvlm", 8, {}, video_scope="per_clip")
    model = tiny.qwen2_5_vl()
    with prunevlm.prune(model, config=str(path)) as handle:
        assert handle.video_scope == "per_clip"
    with pytest.raises(InvalidConfig, match="calibrated with video_scope='per_clip'; pass that"):
        prunevlm.prune(model, config=str(path), video_scope="per_frame")
    with prunevlm.prune(model, config=str(path), video_scope="per_clip") as handle:
        assert handle.video_scope == "per_clip"
