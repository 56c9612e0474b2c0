"""prunevlm calibrate on a real PostgreSQL server (docs/calibration.md): several worker processes on the demo
model share one study, a worker killed mid-trial loses nothing, and a bad storage is named clearly before any
model loads. The server is a throwaway cluster (tests/pgserver.py); where it cannot start the tests skip,
saying what to install, except under CI (the environment variable CI set), where they fail."""

import json
import os
import re
import signal
import time

import optuna
import pytest

import pgserver
from prunevlm.calibrate.search import samples_digest
from prunevlm.calibrate.storage import open_study, prepare_study
from prunevlm.cli import main
from workers import Worker, start_together

STUDY = "vflowopt-T0.25"
HEARTBEAT = {"PRUNEVLM_HEARTBEAT_INTERVAL": "1", "PRUNEVLM_HEARTBEAT_GRACE": "3"}
COMPLETE, RUNNING = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING


@pytest.fixture(scope="module")
def server():
    problem = pgserver.missing()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the PostgreSQL tests, but {problem}")
        pytest.skip(problem)
    with pgserver.throwaway_server() as running:
        yield running


@pytest.fixture
def workers():
    """Start calibrate workers on the demo model with short heartbeats; any still running at the end are killed."""
    started = []

    def start(url, out, trials) -> Worker:
        args = ["calibrate", "--budget", "0.25", "--samples", "3", "--holdout", "0", "--trials", str(trials),
                "--initial", "100", "--threads", "1", "--storage", url, "--out", str(out)]
        started.append(Worker(args, HEARTBEAT))
        return started[-1]

    yield start
    for worker in started:
        worker.kill()


def reported(log: str) -> dict[int, str]:
    """The trials a worker printed as finished, with their values as printed."""
    return {int(n): v for n, v in re.findall(r"^trial (\d+)(?: \(the default configuration\))?: ([-0-9.]+) ",
                                                    log, re.M)}


def assert_written_best(out, study) -> None:
    config = json.loads(out.read_text())
    best = study.best_trial
    assert config["best_trial"] == best.number and config["objective"] == best.value
    assert config["options"]["r_v"] == best.params["r_v"] and config["options"]["t"] == best.params["t"]
    default = next(t for t in study.get_trials(states=(COMPLETE,)) if t.user_attrs.get("default"))
    assert config["default_objective"] == default.value and config["best_is_default"] == (best.number == default.number)


def test_two_workers_fill_one_study_exactly(server, workers, tmp_path):
    url, trials = server.create("shared"), 10
    procs = [workers(url, tmp_path / f"worker{i}.json", trials) for i in range(2)]
    start_together(procs)
    logs = [p.finish() for p in procs]
    study = optuna.load_study(study_name=STUDY, storage=url)
    complete = study.get_trials(states=(COMPLETE,))
    assert len(complete) == trials
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == trials  # no configuration evaluated twice
    assert sum(bool(t.user_attrs.get("default")) for t in complete) == 1
    # every other trial is a place another worker had already taken, given up before it ran
    assert all(t.state == optuna.trial.TrialState.PRUNED and "not_run" in t.user_attrs
               for t in study.trials if t.state != COMPLETE)
    values = {t.number: f"{t.value:.4f}" for t in complete}
    for log in logs:  # no result a worker reported is lost
        assert reported(log).items() <= values.items()
    assert sum(map(len, map(reported, logs))) == trials
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    for i in range(2):
        assert_written_best(tmp_path / f"worker{i}.json", study)


def victim_trial(study, pid: int):
    return next((t for t in study.get_trials(states=(RUNNING,)) if t.user_attrs.get("worker", "").endswith(f":{pid}")),
                None)


def test_a_worker_killed_mid_trial_is_retried_by_a_survivor(server, workers, tmp_path, monkeypatch):
    url, trials = server.create("killed"), 6
    victim = workers(url, tmp_path / "victim.json", trials)
    survivor = workers(url, tmp_path / "survivor.json", trials)
    survivor.wait_for("calibrating")
    survivor.signal(signal.SIGSTOP)  # paused until the kill, so the victim alone runs the first trials
    storage, deadline = optuna.storages.RDBStorage(url), time.time() + 60
    while True:  # freeze the victim while it runs a trial, look, and kill it
        assert victim.process.poll() is None, f"the victim stopped before it could be killed: {victim.log()[-2000:]}"
        assert time.time() < deadline, "the victim ran no trial in 60 s"
        study = optuna.load_study(study_name=STUDY, storage=storage) if optuna.get_all_study_names(storage) else None
        if study and victim_trial(study, victim.pid):
            victim.signal(signal.SIGSTOP)
            killed = victim_trial(study, victim.pid)
            if killed:
                break
            victim.signal(signal.SIGCONT)
        time.sleep(0.05)
    before = {(t.number, t.value) for t in study.get_trials(states=(COMPLETE,))}
    victim.signal(signal.SIGKILL)
    victim.process.wait()
    survivor.signal(signal.SIGCONT)
    survivor.finish()
    study = optuna.load_study(study_name=STUDY, storage=url)
    complete = study.get_trials(states=(COMPLETE,))
    assert study.trials[killed.number].state == optuna.trial.TrialState.FAIL  # failed by the heartbeat
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == COMPLETE and retries[0].params == killed.params
    assert retries[0].user_attrs["worker"].endswith(f":{survivor.pid}")
    assert before <= {(t.number, t.value) for t in complete}  # nothing finished before the kill is lost
    assert len(complete) == trials
    assert_written_best(tmp_path / "survivor.json", study)
    # the victim's command again (here in this process), for two more trials: it continues the same study
    for name, value in HEARTBEAT.items():
        monkeypatch.setenv(name, value)
    calibrate(url, tmp_path / "restarted.json", trials=trials + 2)
    study = optuna.load_study(study_name=STUDY, storage=url)
    complete = study.get_trials(states=(COMPLETE,))
    assert len(complete) == trials + 2 and before <= {(t.number, t.value) for t in complete}
    assert sum(t.user_attrs["worker"].endswith(f":{os.getpid()}") for t in complete) == 2
    assert_written_best(tmp_path / "restarted.json", study)


def calibrate(url, out, study=STUDY, budget="0.25", samples="3", trials=2):
    """The workers' command, in this process."""
    main(["calibrate", "--budget", budget, "--samples", samples, "--holdout", "0", "--trials", str(trials),
          "--initial", "100", "--study", study, "--storage", url, "--out", str(out)])


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Loading a model fails the test: storage errors must come first (in an empty working folder)."""
    import prunevlm.demo.accuracy

    monkeypatch.chdir(tmp_path)
    def load(*_, **__):
        raise AssertionError("a model was loaded before the storage was checked")

    monkeypatch.setattr(prunevlm.demo.accuracy, "load", load)


def refused(url, match, **args) -> str:
    with pytest.raises(SystemExit) as raised:
        calibrate(url, "never-written.json", **args)
    message = str(raised.value.code)
    assert re.search(match, message), message
    assert pgserver.PASSWORD not in message and "wrong-pw" not in message
    return message


def test_an_unreachable_server_a_wrong_password_and_a_missing_database_are_named(server, no_model):
    closed = pgserver.free_port()
    message = refused(server.url("x", port=closed), r"cannot open the study storage postgresql://prunevlm:\*\*\*@"
                      rf"127\.0\.0\.1:{closed}/x: .*refused.*; check that the database server runs")
    assert "\n" not in message
    refused(server.url("postgres", password="wrong-pw"), r"password authentication failed .*check the user name and "
                                                         r"password in the URL")
    refused(server.url("nowhere"), r"database \"nowhere\" does not exist; create the database on the server")


def test_a_database_holding_another_study_is_refused(server, no_model):
    url = server.create("foreign")
    other = optuna.create_study(study_name="theirs", storage=url, direction="minimize")
    other.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    refused(url, r"the study 'theirs' in postgresql://prunevlm:\*\*\*@.* was not made by prunevlm calibrate",
            study="theirs")


def test_a_study_of_another_budget_or_other_samples_is_refused(server, no_model):
    url = server.create("mine")
    from prunevlm.calibrate import demo_samples

    study = open_study(url, "mine", 0, 3)
    prepare_study(study, url, budget=0.25, samples=samples_digest(demo_samples(3, 0)))
    refused(url, r"the study 'mine' .* searches budget 0\.25, this run's is 0\.1: give its --budget", study="mine",
            budget="0.1")
    refused(url, r"searches samples .* every worker must calibrate on the same samples", study="mine", samples="4")
