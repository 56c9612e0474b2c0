"""`prunevlm demo` and `prunevlm eval` on the bundled demo model: printed answers, token counts, written files."""

import json
import re

import pytest
import torch
from PIL import Image

import prunevlm
from prunevlm.calibrate.flow import last_token_states
from prunevlm import DEMO_CONFIGS
from prunevlm.cli import main
from prunevlm.demo import accuracy
from prunevlm.demo import dataset
from prunevlm.demo import dataset as ds

CALIBRATED = DEMO_CONFIGS[0.25]


@pytest.fixture(scope="module")
def loaded():
    return accuracy.load()


@pytest.mark.parametrize("method, budget", [(None, None), ("flashvlm", 16), ("vflowopt", 0.25)])
def test_predict_states_equal_a_separate_prefill(loaded, method, budget):
    """The eval reads the flow measure from generate's prefill; it must be the calibration's h."""
    model, processor = loaded
    items = accuracy.test_items(n_images=2)
    handle = prunevlm.prune(model, method, budget) if method else None
    try:
        answers, states = accuracy.predict(model, processor, items, batch_size=4, return_states=True)
        plain = accuracy.predict(model, processor, items, batch_size=4)
        reference = last_token_states(model, processor, [(i.image, i.question) for i in items], batch_size=4)
    finally:
        if handle:
            handle.remove()
    assert answers == plain and len(answers) == 12
    torch.testing.assert_close(states, reference, rtol=1e-4, atol=1e-5)


def test_eval_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", "--images", "2", "--methods", "flashvlm,uniform,vispruner", "--budgets", "32,16",
          "--vflowopt", str(CALIBRATED), "--kv-samples", "2", "--batch-size", "12", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["splits"]) == ["test", "crowded"]  # the default --split
    for split, questions in (("test", 12), ("crowded", 6)):
        rows = result["splits"][split]["rows"]
        names = [(r["name"], r["budget"]) for r in rows]
        assert names == [("unpruned", None), ("flashvlm", 32), ("flashvlm", 16), ("uniform", 32), ("uniform", 16),
                         ("vispruner", 32), ("vispruner", 16), ("vflowopt (calibrated)", 0.25), ("vflowopt (default)", 0.25)]
        base, *pruned = rows
        assert result["splits"][split]["questions"] == questions and base["fidelity"] is None and base["kept_tokens"] == 144
        for row in pruned:
            assert 0 < row["kv_bytes"] < base["kv_bytes"] and -1 <= row["fidelity"] <= 1
            assert row["questions"] == questions and len(row["correct"]) == questions
            assert row["correct"].count("1") == round(row["accuracy"]["overall"] * questions)
        assert [r["kept_tokens"] for r in pruned[:6]] == [32, 16] * 3
        assert all(abs(r["layer_average_tokens"] - 0.25 * 144) <= 1 for r in pruned[6:])
    # flashvlm against vispruner at both budgets, overall and per type; divprune did not run
    pairs = {(c["split"], c["against"], c["budget"], c["qtype"]) for c in result["comparisons"]}
    assert pairs == {(split, "vispruner", b, q) for b in (32, 16)
                     for split, types in (("test", ds.QTYPES), ("crowded", ds.CROWDED_QTYPES)) for q in ("overall", *types)}
    for c in result["comparisons"]:
        assert c["low"] <= c["difference"] <= c["high"] and c["groups"] == 2
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == 2 * (len(names) + 1) + len(ds.QTYPES) + len(ds.CROWDED_QTYPES) + 3
    assert "flashvlm minus vispruner" in table and "flashvlm minus divprune" not in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("split", ["train", "crowded,crowded", "", "test,val"])
def test_eval_refuses_a_split_it_does_not_hold_out(split, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--split", split])
    assert "held-out splits from test, crowded" in capsys.readouterr().err


def test_demo_prints_answers_with_token_counts_and_draws_them(tmp_path, capsys):
    out = tmp_path / "demo.png"
    main(["demo", "--questions", "2", "--crowded", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    for method in ("flashvlm", "vispruner"):
        for budget in (64, 32, 16, 8):
            before, after = map(int, re.search(rf"{method} {budget} +\d/3 right; prompt (\d+) -> (\d+) tokens", printed).groups())
            assert before - after == 144 - budget
    assert re.search(r"unpruned +\d/3 right\n", printed)
    assert dataset.render("crowded", 0).questions[0].text in printed  # the crowded scene's question, last
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > image.height > 0


def test_captions_wrap_to_the_cell_width():
    from PIL import ImageFont

    from prunevlm.viz import wrap

    font = ImageFont.load_default(size=11)
    text = "what letter is on the purple triangle?\ntruth: r"
    lines = wrap(text, font, 160)
    assert len(lines) == 3 and " ".join(lines) == text.replace("\n", " ")
    assert all(font.getlength(line) <= 160 for line in lines)


def test_demo_with_no_question_says_so():
    with pytest.raises(SystemExit, match="nothing to show: give --questions or --crowded above 0"):
        main(["demo", "--questions", "0", "--crowded", "0"])
