"""The command line: methods, generate (real from_pretrained of a local folder), bench (tiny shape)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import prunevlm.config
import tiny
from prunevlm.bench import timing
from prunevlm.cli import build_parser, check, main


def test_methods_lists_methods_and_models(capsys):
    main(["methods"])
    out = capsys.readouterr().out
    for name in ("flashvlm", "vispruner", "random", "uniform", "LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        assert name in out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    tiny.save_llava_folder(path)
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path / "red.png")
    return path


def test_generate_loads_a_folder_and_reports_token_counts(folder, capsys):
    main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3 w4",
          "--method", "flashvlm", "--budget", "4", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert "visual tokens per image [[16]] -> [[4]]" in err


def test_generate_fraction_and_options(folder, capsys):
    main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3",
          "--method", "vispruner", "--budget", "0.5", "--option", "dedup_schedule=geometric", "--max-new-tokens", "2"])
    assert "[[16]] -> [[8]]" in capsys.readouterr().err


def test_generate_batches_images_and_jsonl_rows(folder, tmp_path, capsys):
    main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--image", str(folder / "red.png"),
          "--image", str(folder / "red.png"), "--prompt", "w3", "--budget", "4", "--batch-size", "2", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == [f"row {i} (red.png)" for i in range(3)]
    assert "rows 0-1: visual tokens per image [[16], [16]] -> [[4], [4]]" in captured.err
    assert "rows 2-2:" in captured.err
    rows = tmp_path / "rows.jsonl"
    Image.new("RGB", (40, 48), (30, 200, 30)).save(tmp_path / "green.png")
    rows.write_text(json.dumps({"image": [str(folder / "red.png"), "green.png"], "prompt": "w3"}) + "\n"
                    + json.dumps({"image": None, "prompt": "w4 w5"}) + "\n")
    main(["generate", "--model", str(folder), "--jsonl", str(rows), "--budget", "0.25", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert "visual tokens per image [[16, 16], []] -> [[4, 4], []]" in captured.err
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["row 0 (red.png, green.png)", "row 1 (no image)"]


def test_generate_with_a_config_and_a_picture(folder, tmp_path, capsys):
    config = tmp_path / "configs" / "vispruner-8.json"
    prunevlm.config.save_config(str(config), "vispruner", 8, {"dedup_schedule": "geometric"})
    picture = tmp_path / "pictures" / "kept.png"
    main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3",
          "--config", str(config), "--save-picture", str(picture), "--max-new-tokens", "2"])
    assert "[vispruner, budget 8]" in capsys.readouterr().err
    assert Image.open(picture).size[0] > 0


def test_a_picture_path_without_a_format_is_refused_before_the_model_loads(folder, monkeypatch):
    import prunevlm.loading

    monkeypatch.setattr(prunevlm.loading, "load", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="no file extension"):
        main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3",
              "--save-picture", "kept"])


def test_generate_explains_bad_input(folder, tmp_path):
    with pytest.raises(SystemExit, match="no option"):
        main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3",
              "--option", "speed=11"])
    with pytest.raises(SystemExit, match="option eta must be float in \\[0, 1\\], got 'high' \\(str\\)"):
        main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3",
              "--option", "eta=high"])
    with pytest.raises(SystemExit, match="contains the image placeholder '<image>'"):
        main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "<image> <image> w3"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["generate", "--model", str(folder), "--image", str(tmp_path / "broken.png"), "--prompt", "w3"])


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "M", "--image", "missing.png", "--prompt", "w"], "argument --image: no file 'missing.png'"),
    (["generate", "--model", "./no/such/folder", "--prompt", "w"], "argument --model: no folder './no/such/folder'"),
    (["generate", "--model", "M", "--method", "fastest", "--prompt", "w"], r"unknown method\(s\) \['fastest'\]"),
    (["generate", "--model", "M"], "give --prompt"),
    (["eval", "--images", "0"], "argument --images: must be an int >= 1, got '0'"),
    (["eval", "--methods", "flashvlm,nope"], r"unknown method\(s\) \['nope'\]"),
    (["demo", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["generate", "--model", "M", "--prompt", "w", "--budget-scope", "crop"], "argument --budget-scope: invalid choice: 'crop'"),
    (["generate", "--model", "M", "--prompt", "w", "--method", "none", "--budget", "4", "--option", "eta=0.1"],
     "--method none runs the unpruned model, so --budget, --option would do nothing"),
    (["generate", "--model", "M", "--prompt", "w", "--method", "none", "--save-picture", "p.png"], "so --save-picture would do nothing"),
    (["generate", "--model", "M", "--prompt", "w", "--method", "flashvlm,vispruner"], "give one --method, got flashvlm,vispruner"),
])
def test_bad_flags_are_refused_while_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_a_config_with_an_unknown_option_is_named_while_parsing(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"format": prunevlm.config.FORMAT, "method": "flashvlm", "budget": 8, "options": {"speed": 1}}))
    with pytest.raises(SystemExit) as raised:
        main(["generate", "--model", "M", "--prompt", "w", "--config", str(config)])
    assert raised.value.code == 2 and r"flashvlm has no option(s) ['speed']" in capsys.readouterr().err


def test_a_seed_the_sampler_cannot_take_is_refused_while_parsing(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        check(parser.parse_args(["calibrate", "--budget", "0.1", "--seed", str(2**70)]), parser)
    assert "argument --seed: must be an int in [0, 2**32)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_eval_and_demo_refuse_a_model_of_another_kind_before_loading_it(tmp_path, capsys, monkeypatch, command):
    """A text-only LLM folder used to be loaded as a LLaVA, which filled in a 7B model around it (#26 item 6)."""
    from transformers import LlamaConfig

    from prunevlm.demo import accuracy

    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2).save_pretrained(tmp_path)
    monkeypatch.setattr(accuracy, "load", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as raised:
        main([command, "--model", str(tmp_path)])
    assert raised.value.code == 2
    assert "holds a 'llama' model, not a demo-format 'llava' one" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_weights_file_is_named(folder, tmp_path, damage):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage" * 100)
    with pytest.raises(SystemExit, match="the weights of .* are damaged .* download or save_pretrained the model again"):
        main(["generate", "--model", str(copy), "--prompt", "w3", "--max-new-tokens", "1"])


def test_help_says_each_default_once_and_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, f"prunevlm {name} {action.option_strings or action.dest} has no help"
        flat = " ".join(text.split())
        assert not re.search(r"\(default[^)]*\) \(default", flat), f"prunevlm {name} --help says a default twice"
        assert "(default: None)" not in flat and "(default: [])" not in flat


def test_eval_names_the_unpruned_row_without_a_budget(tmp_path, capsys):
    main(["eval", "--images", "1", "--methods", "uniform", "--budgets", "16", "--vflowopt", "", "--kv-samples", "1",
          "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert re.search(r"unpruned +: accuracy", err) and "None" not in err


def test_a_folder_of_an_unsupported_model_gets_prunevlm_s_message(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="holds a 'gpt2' model .* not a vision-language model; prunevlm supports Llava"):
        main(["generate", "--model", str(tmp_path), "--prompt", "w"])


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from prunevlm.cli import main\n"
            "for argv in (['--help'], ['--version'], ['eval', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "prunevlm 0.1.0" in result.stdout and "--vflowopt" in result.stdout
    module = subprocess.run([sys.executable, "-m", "prunevlm", "--version"], capture_output=True, text=True)
    assert module.stdout.strip() == "prunevlm 0.1.0"


def test_bench_writes_a_table_and_json(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    runs = []
    measure_once = timing.measure_once
    monkeypatch.setattr(timing, "measure_once", lambda *args: runs.append(args[2:4]) or measure_once(*args))
    main(["bench", "--shape", "tiny", "--methods", "none,flashvlm,flashvlm", "--budgets", "576,64,64",
          "--repeats", "1", "--decode-tokens", "2", "--diversity-tokens", "300", "--out", str(out)])
    # repeated methods and budgets are measured once per round (a warm-up round and one measured round)
    assert sorted(runs, key=str) == sorted([("none", None), ("flashvlm", 576), ("flashvlm", 64)] * 2, key=str)
    report = json.loads(out.read_text())
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert rows[("flashvlm", 64)]["kept"] == 64
    assert rows[("flashvlm", 64)]["kv_mb"] < rows[("none", None)]["kv_mb"]
    assert "| flashvlm | 64 |" in capsys.readouterr().out
    assert report["diversity_partition"]["tokens"] == 300


@pytest.mark.parametrize("family,scope,kept,refused", [
    # 5 crops of 24 x 24, 8 tokens each; an in-LLM method cannot split its budget over crops
    ("next", "per_crop", 5 * 8, {"vflowopt": "prunes inside the LLM", "fastv": "prunes inside the LLM"}),
    ("onevision", "per_image", 8, {"fastv": "out of reach"}),  # 2 LLM layers; vflowopt runs
    ("qwen3vl", "per_image", 8, {"vflowopt": "DeepStack", "fastv": "out of reach"}),
])
def test_bench_runs_each_family_and_records_what_it_refuses(tmp_path, capsys, family, scope, kept, refused):
    out = tmp_path / "bench.json"
    main(["bench", "--model-family", family, "--shape", "tiny", "--budget-scope", scope, "--methods",
          "none,flashvlm,vflowopt,fastv", "--budgets", "8", "--repeats", "1", "--decode-tokens", "2",
          "--diversity-tokens", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert report["model_family"] == family and report["budget_scope"] == scope
    assert rows["flashvlm"]["kept"] == kept and rows["flashvlm"]["kv_mb"] < rows["none"]["kv_mb"]
    assert 0 < rows["flashvlm"]["signal_ms"] <= rows["flashvlm"]["selection_ms"]
    table = capsys.readouterr().out
    for method, reason in refused.items():
        assert reason in rows[method]["refused"] and f"{method} at 8 refused" in table
    assert set(refused) == {r["method"] for r in report["rows"] if "refused" in r}


def test_docs_list_every_option_as_the_cli_prints_it(capsys):
    main(["methods", "--markdown"])
    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    section = docs.split("<!-- options:begin -->\n", 1)[1].split("<!-- options:end -->", 1)[0]
    assert section == capsys.readouterr().out, "docs/methods.md is stale: paste `prunevlm methods --markdown` there"


def test_methods_verbose_explains_each_option(capsys):
    main(["methods", "--verbose"])
    out = capsys.readouterr().out
    assert "eta (float, in [0, 1]; default 0.5): text weight in the log-domain fusion" in out
    assert "dedup_schedule (str, one of 'fixed', 'geometric'; default 'fixed')" in out


def test_bench_records_a_refusal_and_stops_on_any_other_error(monkeypatch):
    """Only a `Refused` (a budget out of reach, a layer the model does not allow) becomes a refused row; any
    other error is a fault and stops the run instead of being written down as a refusal."""
    from prunevlm.bench import timing
    from prunevlm.methods.base import Refused

    def measure_once(model, inputs, method, budget, *rest):
        if method == "fastv":
            raise Refused("fastv: out of reach")
        raise ValueError("too many values to unpack")

    monkeypatch.setattr(timing, "measure_once", measure_once)
    assert timing.measure(None, {}, [("fastv", 8)], repeats=1, decode_tokens=1) == [
        {"method": "fastv", "budget": 8, "refused": "fastv: out of reach"}]
    with pytest.raises(ValueError, match="unpack"):
        timing.measure(None, {}, [("flashvlm", 8)], repeats=1, decode_tokens=1)
