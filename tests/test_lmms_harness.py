"""The lmms-eval plugin's parts that need no lmms-eval (prunevlm/lmms_eval/harness.py, tasks.py), on the bundled
demo model: model_args refused before a model loads, batches that answer as `prunevlm eval` does, per-row
stats, loglikelihood through generate, and the exported demo tasks. tests/test_lmms_eval.py runs the real
lmms-eval (make test-lmms)."""

import json

import numpy as np
import pytest
import torch

import prunevlm
from prunevlm.demo import accuracy, dataset
from prunevlm.lmms_eval import tasks
from prunevlm.cli import main
from prunevlm.lmms_eval.harness import PrunedModel, cut, generation_kwargs, parse_model_args
from prunevlm.loading import prompt_inputs

DEMO = prunevlm.DEMO_MODEL
ITEMS = accuracy.test_items(2)  # 12 questions


@pytest.mark.parametrize("args, error, match", [
    ({"method": "flashvlm", "budget": 16}, ValueError, "needs pretrained="),
    ({"pretrained": DEMO, "budget": 16}, ValueError, "needs method="),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "bugdet": 3}, ValueError, r"unknown model_args \['bugdet'\].*budget: tokens"),
    ({"pretrained": DEMO, "method": "flashvlm"}, TypeError, "needs a budget"),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": 0}, ValueError, "keeps no visual token"),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": 1.5}, ValueError, r"fraction .* \(0, 1\]"),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": "lots"}, ValueError, "budget must be an int"),
    ({"pretrained": DEMO, "method": "flashvm", "budget": 16}, ValueError, "unknown method 'flashvm'; available: flashvlm"),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "option_etta": 0.3}, TypeError, r"no option\(s\) \['etta'\]"),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "option_eta": 7}, ValueError, "eta"),
    ({"pretrained": DEMO, "method": "none", "budget": 16}, ValueError, "method=none is the unpruned model: drop budget"),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "positions": "packed"}, ValueError, "original or compact"),
    ({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "dtype": "int8"}, ValueError, "dtype must be one of"),
    ({"pretrained": DEMO, "method": "flashvlm", "config": prunevlm.DEMO_CONFIGS[0.1]}, ValueError, "config is for 'vflowopt'"),
    ({"pretrained": DEMO, "method": "vflowopt", "budget": 0.5, "config": prunevlm.DEMO_CONFIGS[0.1]}, ValueError, "calibrated for budget 0.1"),
    ({"pretrained": DEMO, "method": "vflowopt", "config": "no/such.json"}, ValueError, "cannot read the pruning config"),
])
def test_bad_model_args_are_refused_before_a_model_loads(args, error, match):
    with pytest.raises(error, match=match):
        parse_model_args(args)


def test_model_args_as_lmms_eval_hands_them_over():
    """Numbers arrive converted, lists as JSON text; a config gives the method's options and budget."""
    settings = parse_model_args({"pretrained": DEMO, "method": "vflowopt", "budget": 0.25, "option_layers": "[2,4]"})
    assert settings.method.layers == (2, 4) and settings.budget == prunevlm.Budget(0.25)
    calibrated = json.load(open(prunevlm.DEMO_CONFIGS[0.25]))
    settings = parse_model_args({"pretrained": DEMO, "method": "vflowopt", "config": prunevlm.DEMO_CONFIGS[0.25]})
    assert settings.budget == prunevlm.Budget(calibrated["budget"])
    assert settings.method.t == calibrated["options"]["t"]
    assert parse_model_args({"pretrained": DEMO, "method": "flashvlm", "budget": "16"}).budget == prunevlm.Budget(16)
    assert parse_model_args({"pretrained": DEMO, "method": "none"}).method is None
    assert parse_model_args({"pretrained": DEMO, "method": "flashvlm", "budget": 16}).budget_scope == "per_image"
    scoped = parse_model_args({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "budget_scope": "per_crop"})
    assert scoped.budget_scope == "per_crop"
    with pytest.raises(ValueError, match="budget_scope must be 'per_image'"):
        parse_model_args({"pretrained": DEMO, "method": "flashvlm", "budget": 16, "budget_scope": "crop"})


def test_generation_kwargs_of_lmms_eval_tasks():
    config = type("Config", (), {"max_new_tokens": 4})()
    until, kwargs = generation_kwargs({"until": "\n\n", "temperature": 0, "top_p": 1.0, "num_beams": 1}, config)
    assert until == ["\n\n"] and kwargs == {"max_new_tokens": 4, "num_beams": 1, "do_sample": False}
    _, kwargs = generation_kwargs({"max_gen_toks": 9, "temperature": 0.7, "top_p": 0.9}, config)
    assert kwargs == {"max_new_tokens": 9, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert cut("yes\n\nQ: next", ["\n\n"]) == "yes" and cut("no", []) == "no"


@pytest.fixture(scope="module")
def flashvlm16():
    pruned = PrunedModel(parse_model_args({"pretrained": DEMO, "method": "flashvlm", "budget": 16}), "cpu")
    yield pruned
    pruned.remove()


def test_batches_answer_as_prunevlm_eval(flashvlm16):
    """Left-padded batches of 5 through the plugin give `accuracy.predict`'s answers (same prune, batches of
    12), and each row's stats: 144 visual tokens -> 16, the prompt shorter by the 128 dropped."""
    answers, stats = [], []
    for start in range(0, len(ITEMS), 5):
        batch = ITEMS[start:start + 5]
        got, rows = flashvlm16.generate([[it.image] for it in batch], [it.question for it in batch],
                                        {"max_new_tokens": tasks.MAX_NEW_TOKENS, "until": ["\n\n"], "do_sample": False})
        answers += got
        stats += rows
    assert [dataset.normalize(a) for a in answers] == accuracy.predict(flashvlm16.model, flashvlm16.processor, ITEMS, 12)
    assert [row["visual_tokens"] for row in stats] == [[144]] * len(ITEMS)
    assert [row["visual_tokens_kept"] for row in stats] == [[16]] * len(ITEMS)
    assert all(row["prompt_tokens"] - row["prompt_tokens_kept"] == 128 for row in stats)
    assert all(row["selection_ms"] > 0 and row["output_tokens"] >= 1 for row in stats)


def test_unpruned_rows_report_every_token():
    plain = PrunedModel(parse_model_args({"pretrained": DEMO, "method": "none"}), "cpu")
    batch = ITEMS[:2]
    answers, stats = plain.generate([[it.image] for it in batch], [it.question for it in batch], {"max_new_tokens": 4})
    assert [row["visual_tokens_kept"] for row in stats] == [[144], [144]]
    assert [row["prompt_tokens"] for row in stats] == [row["prompt_tokens_kept"] for row in stats]
    assert [dataset.normalize(a) for a in answers] == accuracy.predict(plain.model, plain.processor, batch)


def test_loglikelihood_is_generates_score_with_the_selection_made_without_the_answer(flashvlm16):
    """The greedy answer's loss is minus the mean of generate's own step log-probabilities, and greedy; a
    wrong answer has a higher loss and is not greedy; the kept tokens are those of answering (the candidate answer does
    not steer the text-guided selection)."""
    batch = ITEMS[:6]
    images, questions = [[it.image] for it in batch], [it.question for it in batch]
    answers, _ = flashvlm16.generate(images, questions, {"max_new_tokens": 4})
    kept_answering = [k.tolist() for row in flashvlm16.handle.stats.kept for k in row]
    right = flashvlm16.loglikelihood(images, questions, answers)
    assert [k.tolist() for row in flashvlm16.handle.stats.kept for k in row] == kept_answering
    wrong = flashvlm16.loglikelihood(images, questions, ["purple cross"] * len(batch))
    assert [k.tolist() for row in flashvlm16.handle.stats.kept for k in row] == kept_answering
    for item, answer, (loss, greedy), (wrong_loss, wrong_greedy) in zip(batch, answers, right, wrong):
        inputs = prompt_inputs(flashvlm16.processor, [item.image], [item.question], "cpu")
        with torch.inference_mode():
            out = flashvlm16.model.generate(**inputs, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        assert new[:-1] == flashvlm16.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]  # then eos
        steps = [float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(out.scores, new[:-1])]
        assert loss == pytest.approx(-sum(steps) / len(steps), abs=1e-3) and greedy
        assert wrong_loss > loss and not wrong_greedy


def test_exported_tasks_hold_the_test_split_in_evals_order(tmp_path):
    yaml_path = tasks.export(tmp_path / "tasks", images=2)
    rows = [json.loads(line) for line in open(tmp_path / "tasks" / f"{tasks.TASK}.jsonl")]
    assert [(r["question"], r["answer"], r["qtype"]) for r in rows] == [(it.question, it.answer, it.qtype) for it in ITEMS]
    for row, item in zip(rows, ITEMS):
        (image,) = tasks.doc_to_visual(row)
        assert np.array_equal(np.asarray(image), np.asarray(item.image.convert("RGB")))
    text = yaml_path.read_text()
    assert f"test: {json.dumps(str(tmp_path / 'tasks' / f'{tasks.TASK}.jsonl'))}" in text
    assert f"max_new_tokens: {tasks.MAX_NEW_TOKENS}" in text and "doc_to_text: question" in text
    with open(f"{DEMO}/generation_config.json") as f:
        assert json.load(f)["max_new_tokens"] == tasks.MAX_NEW_TOKENS  # the tasks generate as eval does


def test_task_metrics_are_evals_exact_match():
    docs = [{"answer": it.answer, "qtype": it.qtype} for it in ITEMS]
    replies = [f" {it.answer.upper()}." if i % 3 else "wrong" for i, it in enumerate(ITEMS)]
    results = [tasks.process_results(doc, [reply]) for doc, reply in zip(docs, replies)]
    expected = accuracy.score(ITEMS, [dataset.normalize(r) for r in replies])
    assert sum(r["exact_match"] for r in results) / len(results) == expected["overall"]
    for qtype in dataset.QTYPES:
        assert tasks.mean_of_present([r[f"exact_match_{qtype}"] for r in results]) == expected[qtype]
    assert np.isnan(tasks.mean_of_present([None, None]))


def test_export_command(tmp_path, capsys):
    main(["export-lmms-tasks", str(tmp_path / "t"), "--images", "1"])
    assert f"--include_path {tmp_path / 't'} --tasks prunevlm_demo" in capsys.readouterr().out
    assert len(open(tmp_path / "t" / f"{tasks.TASK}.jsonl").readlines()) == len(dataset.QTYPES)
    with pytest.raises(SystemExit):
        main(["export-lmms-tasks", str(tmp_path / "u"), "--images", "0"])
    assert "argument --images: must be an int >= 1" in capsys.readouterr().err
