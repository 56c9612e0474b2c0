"""The real lmms-eval with the plugin on the bundled demo model, offline, over the exported demo tasks: the
`lmms-eval` command agrees with `prunevlm eval` (accuracy.predict and score) on the same samples, lmms-eval's
response cache never answers one pruning setting with another's answers, and a multiple-choice task scores
through the plugin's loglikelihood. Skipped where lmms-eval is not installed; `make test-lmms` builds
.venv-lmms with it (docs/lmms-eval.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSONL; nothing may reach a hub
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed here: `make test-lmms` runs these tests in "
                                        ".venv-lmms (docs/lmms-eval.md has the install line)")

import torch  # noqa: E402

import prunevlm  # noqa: E402
from prunevlm.demo import accuracy, dataset  # noqa: E402
from prunevlm.lmms_eval.tasks import TASK, doc_to_visual, export  # noqa: E402
from prunevlm.loading import prompt_inputs  # noqa: E402

LIMIT, BATCH = 12, 4  # the first two test images; prunevlm eval below runs the same batches
ITEMS = accuracy.test_items(2)[:LIMIT]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return export(tmp_path_factory.mktemp("lmms-tasks"), images=3).parent  # more documents than --limit


@pytest.fixture(scope="module")
def demo():
    return accuracy.load()


def prunevlm_eval(demo, method: str, budget) -> tuple[list[str], dict]:
    model, processor = demo
    with prunevlm.prune(model, method, budget):
        answers = accuracy.predict(model, processor, ITEMS, BATCH)
    return answers, accuracy.score(ITEMS, answers)


def answers_and_counts(samples: list[dict]) -> tuple[list[str], list]:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    replies = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]
    return [dataset.normalize(r) for r in replies], [s["token_counts"][0] for s in samples]


def test_the_lmms_eval_command_agrees_with_prunevlm_eval(task_dir, demo, tmp_path):
    command = [str(Path(sys.executable).with_name("lmms-eval")), "--model", "prunevlm",
               "--model_args", f"pretrained={prunevlm.DEMO_MODEL},method=flashvlm,budget=16",
               "--include_path", str(task_dir), "--tasks", TASK, "--limit", str(LIMIT), "--batch_size", str(BATCH),
               "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    (samples_file,) = (tmp_path / "out").rglob(f"*_samples_{TASK}.jsonl")
    metrics = json.loads(results_file.read_text())["results"][TASK]
    answers, counts = answers_and_counts([json.loads(line) for line in samples_file.read_text().splitlines()])

    expected_answers, expected = prunevlm_eval(demo, "flashvlm", 16)
    assert answers == expected_answers
    assert metrics["exact_match,none"] == expected["overall"]
    for qtype in dataset.QTYPES:
        assert metrics[f"exact_match_{qtype},none"] == expected[qtype]
    assert [c["prunevlm"]["visual_tokens"] for c in counts] == [[144]] * LIMIT
    assert [c["prunevlm"]["visual_tokens_kept"] for c in counts] == [[16]] * LIMIT
    assert all(c["input_tokens"] == c["prunevlm"]["prompt_tokens_kept"] == c["prunevlm"]["prompt_tokens"] - 128
               for c in counts)
    assert "visual tokens per image 144.0 -> 16.0" in run.stdout + run.stderr  # the run's summary line


def test_changing_method_or_budget_never_reuses_cached_answers(task_dir, demo, tmp_path):
    """One response cache for every run: the same model_args are served from it (no counts: nothing ran),
    another method or budget is computed afresh (its counts show its budget) and answers as prunevlm eval
    does with that setting."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir))

    def lmms_eval(method: str, budget) -> tuple[list[str], list]:
        results = simple_evaluate(model="prunevlm", model_args=f"pretrained={prunevlm.DEMO_MODEL},method={method},budget={budget}",
                                  tasks=[TASK], task_manager=manager, limit=LIMIT, batch_size=BATCH, device="cpu",
                                  use_cache=str(tmp_path / "cache"), log_samples=True)
        return answers_and_counts(results["samples"][TASK])

    first, counts = lmms_eval("flashvlm", 16)
    assert all(c is not None for c in counts)
    again, counts = lmms_eval("flashvlm", 16)
    assert again == first and counts == [None] * LIMIT  # the cache is in use

    differs = []
    for method, budget in (("flashvlm", 2), ("random", 16)):
        answers, counts = lmms_eval(method, budget)
        assert [c["prunevlm"]["visual_tokens_kept"] for c in counts] == [[budget]] * LIMIT
        assert answers == prunevlm_eval(demo, method, budget)[0]
        differs.append(answers != first)
    assert any(differs)  # stale answers from the first setting would have shown in the answers too


def test_a_multiple_choice_task_scores_through_loglikelihood(task_dir, demo, tmp_path):
    """The demo's yes/no questions as a multiple-choice task: lmms-eval builds the requests and scores the
    plugin's (loss, is_greedy) pairs, and the choice it picks (the lowest loss) must be the one the pruned
    model's first generated logits prefer. The requests go to the model directly, not through
    `simple_evaluate`: lmms-eval 0.7.3's evaluator turns every model's loglikelihood pairs into strings
    (`unwrap_generation_output`), so its multiple-choice tasks fail there (docs/lmms-eval.md)."""
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager, get_task_dict

    rows = [json.loads(line) for line in (task_dir / f"{TASK}.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["answer"] in ("yes", "no")][:LIMIT]
    folder = tmp_path / "yesno"
    folder.mkdir()
    (folder / "yesno.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "yesno.yaml").write_text(
        f"task: prunevlm_demo_yesno\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(folder / 'yesno.jsonl'))}\ntest_split: test\noutput_type: multiple_choice\n"
        f"doc_to_visual: !function prunevlm.lmms_eval.tasks.doc_to_visual\ndoc_to_text: question\n"
        f"doc_to_choice: [\"yes\", \"no\"]\ndoc_to_target: answer\ntarget_delimiter: \"\"\n"
        f"metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    task = get_task_dict(["prunevlm_demo_yesno"], TaskManager(include_path=str(folder)))["prunevlm_demo_yesno"]
    task.build_all_requests()
    lm = get_model("prunevlm").create_from_arg_string(f"pretrained={prunevlm.DEMO_MODEL},method=flashvlm,budget=16",
                                                      {"batch_size": BATCH, "device": "cpu"})
    lm.task_dict["prunevlm_demo_yesno"] = task.dataset
    scored = lm.loglikelihood(task.instances)
    by_doc = {}
    for request, result in zip(task.instances, scored):
        by_doc.setdefault(request.doc_id, {})[request.idx] = result
    docs = task.test_docs()
    acc = [task.process_results(docs[d], [by_doc[d][i] for i in sorted(by_doc[d])])["acc"] for d in sorted(by_doc)]

    model, processor = demo
    yes, no = (processor.tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("yes", "no"))
    assert len(yes) == len(no) == 1  # one token each: the first generated logits decide
    hits = []
    with prunevlm.prune(model, "flashvlm", 16):
        for row in rows:
            (image,) = doc_to_visual(row)
            inputs = prompt_inputs(processor, [image], [row["question"]], "cpu")
            with torch.inference_mode():
                logits = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True).logits[0][0]
            hits.append(float(("yes" if logits[yes[0]] > logits[no[0]] else "no") == row["answer"]))
    assert len(acc) == len(rows) and acc == hits
