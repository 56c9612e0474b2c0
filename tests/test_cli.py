"""The command line: methods, generate (real from_pretrained of a local folder), bench (tiny shape)."""

import json

import pytest
from PIL import Image

import tiny
from prunevlm.bench import timing
from prunevlm.cli import main


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
    assert "visual tokens per image [16] -> [4]" in err


def test_generate_fraction_and_options(folder, capsys):
    main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3",
          "--method", "vispruner", "--budget", "0.5", "--option", "dedup_schedule=geometric", "--max-new-tokens", "2"])
    assert "[16] -> [8]" in capsys.readouterr().err


def test_generate_explains_bad_input(folder):
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["generate", "--model", str(folder), "--image", str(folder / "missing.png"), "--prompt", "w3"])
    with pytest.raises(SystemExit, match="no option"):
        main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3",
              "--option", "speed=11"])
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "w3", "--budget", "x"])


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
