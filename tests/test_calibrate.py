"""prunevlm calibrate: a resumable, shareable Optuna study on a tiny model folder and a JSONL data set."""

import json
import os
import random
import shutil
import sqlite3
import sys
import time

import optuna
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import prunevlm
import tiny
from prunevlm.budget import Budget
from prunevlm.calibrate import jsonl_samples, search
from prunevlm.calibrate.search import config_from_params, default_params, r_1_bounds
from prunevlm.cli import main
from prunevlm.loading import load
from prunevlm.methods.vflowopt import VFlowOpt, default_layers
from workers import Worker, start_together


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrate")
    tiny.save_llava_folder(path / "model", layers=4)
    rng = random.Random(0)
    with open(path / "data.jsonl", "w") as f:
        for i in range(12):
            Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3))).save(path / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "prompt": " ".join(f"w{rng.randrange(100)}" for _ in range(4))}) + "\n")
    return path


def command(workdir, name, trials, extra=()):
    return ["calibrate", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--samples", "8",
            "--holdout", "4", "--budget", "0.5", "--trials", str(trials), "--initial", "3", "--threads", "1",
            "--storage", f"sqlite:///{workdir / name}.db", "--out", str(workdir / f"{name}.json"), *extra]


def completed(workdir, name):
    try:
        study = optuna.load_study(study_name="vflowopt-T0.5", storage=f"sqlite:///{workdir / name}.db")
    except KeyError:  # the worker has not created the study yet
        return []
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_every_searched_point_meets_the_budget():
    for budget in (0.1, 0.25, 0.5):
        for r_v in (budget, 1.25 * budget, min(1.0, 1.5 * budget)):
            low, high = r_1_bounds(budget, r_v, (9, 18), 28)
            for r_1 in (low, (low + high) / 2, high):
                plan = VFlowOpt(r_v=r_v, r_1=r_1, layers=(9, 18)).plan(Budget(budget), 729, 28)
                assert abs(plan.layer_average / 729 - budget) < 2 / 729


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.25, 0.4, 0.5, 0.9])
@pytest.mark.parametrize("depth", [4, 28, 32])
def test_the_default_trial_is_the_default_configuration(budget, depth):
    layers = default_layers(depth)
    params = default_params(budget, layers, depth)
    space = search.search_space(budget)
    assert all(space[name].low <= value <= space[name].high for name, value in params.items())  # inside the box
    options = {k: v for k, v in config_from_params(params, budget, layers, depth).items() if k != "layers"}
    for tokens in (144, 576, 729, 2880):
        assert VFlowOpt(**options, layers=layers).plan(Budget(budget), tokens, depth) == \
            VFlowOpt(layers=layers).plan(Budget(budget), tokens, depth)


def test_the_default_configuration_is_the_first_trial_and_never_beaten_unseen(workdir, capsys):
    main(command(workdir, "default", 1))
    config = json.loads((workdir / "default.json").read_text())
    (trial,) = completed(workdir, "default")
    assert trial.number == 0 and trial.user_attrs["default"]
    assert config["best_is_default"] and config["objective"] == config["default_objective"] == trial.value
    assert "the default configuration (trial 0)" in capsys.readouterr().out
    main(command(workdir, "default", 4))  # continued: the search's best is written only if it beats the default
    config = json.loads((workdir / "default.json").read_text())
    assert config["objective"] >= config["default_objective"] == trial.value
    assert [t.user_attrs.get("default", False) for t in completed(workdir, "default")] == [True] + [False] * 3


def test_calibration_creates_the_output_folder_and_puts_its_study_beside(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    main(["calibrate", "--model", "model", "--data", "data.jsonl", "--samples", "4", "--holdout", "0",
          "--budget", "0.5", "--trials", "2", "--initial", "2", "--out", "new/folder/t05.json"])
    assert (workdir / "new" / "folder" / "t05.json").is_file() and (workdir / "new" / "folder" / "t05.db").is_file()


def test_calibration_writes_a_config_that_prune_loads(workdir, capsys):
    main(command(workdir, "basic", 5))
    config = json.loads((workdir / "basic.json").read_text())
    assert config["method"] == "vflowopt" and config["budget"] == 0.5
    assert set(config["options"]) == set(VFlowOpt.options())  # every option: the file means the same under new defaults
    assert config["objective"] >= max(t.value for t in completed(workdir, "basic")) - 1e-9
    assert "holdout" in config
    model = tiny.llava(layers=4)
    with prunevlm.prune(model, "vflowopt", config=str(workdir / "basic.json")) as handle:
        model(**tiny.llava_inputs([1]))
        assert handle.stats.stages[0][0].layers == tuple(config["options"]["layers"])
    # running again with a larger target continues the same study
    before = {(t.number, t.value) for t in completed(workdir, "basic")}
    main(command(workdir, "basic", 7))
    after = {(t.number, t.value) for t in completed(workdir, "basic")}
    assert before < after and len(after) == 7


def counted_references(workdir, monkeypatch):
    """(model, references(cache) -> states, the list that grows by one per computation of the references)."""
    model, processor = load(str(workdir / "model"))
    samples = jsonl_samples(str(workdir / "data.jsonl"))[:3]
    computed, real = [], search.last_token_states
    monkeypatch.setattr(search, "last_token_states", lambda *a, **k: computed.append(1) or real(*a, **k))

    def references(cache):
        return search.FlowObjective(model, processor, samples, Budget(0.5), cache=str(cache)).reference

    return model, references, computed


def test_cached_references_are_recomputed_when_the_weights_change(workdir, tmp_path, monkeypatch):
    model, references, computed = counted_references(workdir, monkeypatch)
    cache = tmp_path / "refs.safetensors"
    first = references(cache)
    again = references(cache)
    assert len(computed) == 1 and torch.equal(first, again)
    with torch.no_grad():  # the same folder name, other weights (a model retrained in place)
        model.model.language_model.norm.weight.mul_(2)
    changed = references(cache)
    assert len(computed) == 2 and not torch.allclose(changed, first)


class Payload:
    """Unpickling it creates `marker`: code a tampered cache would run if it were unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("damage", ["pickle", "garbage", "truncated", "wrong key", "wrong shape"])
def test_a_bad_cache_is_recomputed_never_executed(workdir, tmp_path, monkeypatch, damage):
    _, references, computed = counted_references(workdir, monkeypatch)
    cache, marker = tmp_path / "refs.safetensors", tmp_path / "executed"
    first = references(cache)
    with safe_open(str(cache), framework="pt") as f:
        key = f.metadata()["key"]
    if damage == "pickle":
        torch.save({"key": key, "states": first, "payload": Payload(str(marker))}, cache)
    elif damage == "garbage":
        cache.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:-16])
    else:
        save_file({"states": first[:2] if damage == "wrong shape" else first}, str(cache),
                  metadata={"key": key if damage == "wrong shape" else "0" * 64})
    shutil.copy(cache, tmp_path / "damaged")
    assert torch.equal(references(cache), first) and len(computed) == 2  # recomputed, no crash
    assert not marker.exists()
    assert torch.equal(references(cache), first) and len(computed) == 2  # and overwritten with a valid cache
    if damage == "pickle":  # the payload is live: unpickling the damaged file would have run it
        torch.load(tmp_path / "damaged", weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("damage", ["nan", "inf", "zero row"])
def test_cached_references_with_a_valid_key_but_unusable_states_are_recomputed(workdir, tmp_path, monkeypatch, damage):
    """A NaN or zero reference scores every trial 0 (the report said 'default config 0.0000')."""
    _, references, computed = counted_references(workdir, monkeypatch)
    cache = tmp_path / "refs.safetensors"
    first = references(cache)
    with safe_open(str(cache), framework="pt") as f:
        key = f.metadata()["key"]
    bad = first.clone()
    bad[1] = {"nan": float("nan"), "inf": float("inf"), "zero row": 0.0}[damage]
    save_file({"states": bad}, str(cache), metadata={"key": key})
    with pytest.warns(UserWarning, match=r"refs\.safetensors (hold NaN or infinite values|are all zero) \(samples "
                                         r"\[1\]\); computing them again"):
        again = references(cache)
    assert torch.equal(again, first) and len(computed) == 2


def test_references_the_model_makes_nan_are_refused(workdir, tmp_path, monkeypatch):
    _, references, _ = counted_references(workdir, monkeypatch)
    monkeypatch.setattr(search, "last_token_states", lambda *a, **k: torch.full((3, 32), float("nan")))
    with pytest.raises(ValueError, match=r"the unpruned model's last-token states hold NaN .*: every trial would "
                                         r"score 0 on them; load the model in float32 \(--dtype float32\)"):
        references(tmp_path / "refs.safetensors")


@pytest.mark.parametrize("storage, match", [
    ("garbage.db", r"garbage\.db: file is not a database; the file is not an SQLite database, or it is damaged: "
                   r"move it aside"),
    ("nosuchdb://host/study", r"nosuchdb://host/study: Can't load plugin: sqlalchemy\.dialects:nosuchdb; give an "
                              r"SQLite file, or a URL such as"),
    ("sqlite:////no/such/folder/study.db", r"sqlite:////no/such/folder/study\.db: unable to open database file; "
                                           r"check that the file's folder exists"),
    ("postgresql://me:pw@[::1", r"postgresql://me:\*\*\*@\[::1: not a database URL \(.*\); give an SQLite file, "
                                r"or a URL such as"),
])
def test_a_bad_storage_is_named_before_the_model_loads(workdir, tmp_path, monkeypatch, storage, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.db").write_bytes(random.Random(0).randbytes(8192))
    monkeypatch.setattr("prunevlm.loading.load", lambda *_: pytest.fail("the model loaded before the storage"))
    with pytest.raises(SystemExit, match=rf"^prunevlm calibrate: cannot open the study storage {match}"):
        main(command(workdir, "unused", 2)[:-4] + ["--storage", storage, "--out", "out.json"])


@pytest.mark.parametrize("interval, grace, match", [
    ("0", "120", r"PRUNEVLM_HEARTBEAT_INTERVAL='0': give a whole number of seconds >= 1 \(default 30\)"),
    ("30", "soon", r"PRUNEVLM_HEARTBEAT_GRACE='soon': give a whole number of seconds >= 1 \(default 120\)"),
    ("30", "30", r"PRUNEVLM_HEARTBEAT_GRACE=30 must exceed PRUNEVLM_HEARTBEAT_INTERVAL=30"),
])
def test_bad_heartbeat_settings_are_named(workdir, tmp_path, monkeypatch, interval, grace, match):
    monkeypatch.setenv("PRUNEVLM_HEARTBEAT_INTERVAL", interval)
    monkeypatch.setenv("PRUNEVLM_HEARTBEAT_GRACE", grace)
    with pytest.raises(SystemExit, match=rf"^prunevlm calibrate: {match}"):
        main(command(workdir, "unused", 2)[:-4] + ["--storage", str(tmp_path / "s.db"), "--out", str(tmp_path / "o.json")])


@pytest.mark.parametrize("tamper, match", [
    ("UPDATE trial_params SET param_name = 'v' WHERE param_name = 'u'", r"parameters \['alpha', 'm', 'r_v', 't', 'v'\]"),
    ("UPDATE trial_params SET param_value = 0.9 WHERE param_name = 'r_v'", r"r_v=0\.9, outside the searched \[0\.5, 0\.75\]"),
    ("UPDATE trial_values SET value = 1e6", r"the objective 1000000\.0, beyond ±8"),
])
def test_a_study_with_tampered_trials_is_refused(workdir, tmp_path, tamper, match):
    if not (workdir / "small.db").exists():
        main(command(workdir, "small", 2))
    shutil.copy(workdir / "small.db", tmp_path / "tampered.db")
    with sqlite3.connect(tmp_path / "tampered.db") as db:
        db.execute(tamper)
    args = command(workdir, "unused", 7)[:-4] + ["--storage", str(tmp_path / "tampered.db"), "--out", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit, match=rf"the study 'vflowopt-T0\.5' in .*tampered\.db: trial \d+ holds {match}.*; the "
                                         rf"study was edited or another search wrote it: give another --study name"):
        main(args)
    assert not (tmp_path / "t.json").exists()


def test_a_killed_run_resumes_without_losing_trials(workdir, monkeypatch):
    monkeypatch.setenv("PRUNEVLM_HEARTBEAT_INTERVAL", "1")  # the killed worker's trial is failed after 2 s
    monkeypatch.setenv("PRUNEVLM_HEARTBEAT_GRACE", "2")
    worker = Worker(command(workdir, "killed", 500))
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(1)
        if len(completed(workdir, "killed")) >= 3:
            break
    worker.kill()
    finished = {(t.number, t.value, tuple(sorted(t.params.items()))) for t in completed(workdir, "killed")}
    assert len(finished) >= 3
    main(command(workdir, "killed", len(finished) + 2))
    resumed = {(t.number, t.value, tuple(sorted(t.params.items()))) for t in completed(workdir, "killed")}
    assert finished < resumed and len(resumed) == len(finished) + 2


def test_two_workers_fill_one_study(workdir):
    workers = [Worker(command(workdir, "shared", 8)) for _ in range(2)]
    try:
        start_together(workers)
        for worker in workers:
            worker.finish(timeout=300)
    finally:
        for worker in workers:
            worker.kill()
    trials = completed(workdir, "shared")
    assert len(trials) == 8
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes contributed


def test_two_workers_never_claim_one_waiting_trial(tmp_path):
    """Two workers' storages on one SQLite file pop a waiting trial at the same moment, 60 times: exactly one
    gets it each time. Without BEGIN IMMEDIATE (storage._lock_when_begun) both did, 7 times in 60 here, and
    the second one's result could not be told ("Cannot tell a COMPLETE trial")."""
    import threading

    import optuna

    from prunevlm.calibrate.storage import _rdb_storage

    url = f"sqlite:///{tmp_path / 'race.db'}"
    stores = [_rdb_storage(url, 30, 120) for _ in range(2)]
    optuna.create_study(storage=stores[0], study_name="race")
    studies = [optuna.load_study(study_name="race", storage=store) for store in stores]
    claims = []
    for round_ in range(60):
        studies[0].enqueue_trial({"x": round_}, skip_if_exists=False)
        got, barrier = [None, None], threading.Barrier(2)

        def claim(k):
            barrier.wait()
            got[k] = studies[k]._pop_waiting_trial_id()

        threads = [threading.Thread(target=claim, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        claims.append(sum(g is not None for g in got))
    assert claims == [1] * 60
