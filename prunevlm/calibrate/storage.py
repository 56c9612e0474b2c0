"""Where a calibration study lives (docs/calibration.md): opening an Optuna storage with heartbeats, and
refusing, before any model loads, a storage that cannot be reached or a study another search made.

Every message names the storage with its password masked and says what to do.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time

from ..errors import InvalidInput, InvalidSetting
from .search import sampler

HEARTBEAT_INTERVAL = "PRUNEVLM_HEARTBEAT_INTERVAL"  # seconds between a running trial's heartbeats (default 30)
HEARTBEAT_GRACE = "PRUNEVLM_HEARTBEAT_GRACE"  # seconds without one before the trial is failed and retried (120)

URL_HINT = "give an SQLite file, or a URL such as sqlite:///study.db or postgresql://user:password@host:5432/database"
# The driver's words -> what to do (first match wins).
HINTS = (
    ("authentication failed", "check the user name and password in the URL"),
    ("does not exist", "create the database on the server (e.g. createdb NAME), or correct the URL's database name"),
    ("file is not a database", "the file is not an SQLite database, or it is damaged: move it aside (a new study "
                               "starts) or give another --storage"),
    ("unable to open database file", "check that the file's folder exists and that this user may write there"),
    ("can't load plugin", URL_HINT),
    ("no module named", "install the database driver the URL names: pip install 'prunevlm[calibrate]' installs "
                        "psycopg 3, which postgresql:// means from SQLAlchemy 2.1 on (postgresql+psycopg:// before)"),
    ("storage upgrade", "upgrade the storage as Optuna says, or give a new database"),
)
REACH = "check that the database server runs and that the URL's host and port reach it from this machine"


def storage_name(url: str) -> str:
    """The storage as messages show it: the password in a URL is masked."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds, from the environment (names above) or 30 and 120."""
    values = []
    for name, default in ((HEARTBEAT_INTERVAL, 30), (HEARTBEAT_GRACE, 120)):
        text = os.environ.get(name, str(default))
        if not text.strip().isdigit() or int(text) < 1:
            raise InvalidSetting(f"{name}={text!r}: give a whole number of seconds >= 1 (default {default})")
        values.append(int(text))
    if values[1] <= values[0]:
        raise InvalidSetting(f"{HEARTBEAT_GRACE}={values[1]} must exceed {HEARTBEAT_INTERVAL}={values[0]}: a live "
                             f"worker's trial would be failed between two of its heartbeats")
    return values[0], values[1]


def open_study(storage: str, study: str, seed: int, initial: int):
    """Create or load the study in an RDB storage (a SQLite file or a database URL) with heartbeats, so that a
    killed worker's trial is failed and retried once; a storage that cannot be opened raises InvalidSetting."""
    import warnings

    import optuna
    import sqlalchemy

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, GPSampler
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    interval, grace = heartbeat_settings()
    url = storage if "://" in storage else f"sqlite:///{storage}"
    try:
        sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as error:
        raise InvalidSetting(f"cannot open the study storage {storage_name(storage)}: not a database URL ({error}); "
                             f"{URL_HINT}") from None
    try:
        rdb = _rdb_storage(url, interval, grace)
        names = optuna.get_all_study_names(rdb)
        opened = optuna.create_study(study_name=study, storage=rdb, sampler=sampler(seed, initial), direction="maximize",
                                     load_if_exists=True)
    except Exception as error:
        clear = _storage_error(storage, error)
        if clear is None:
            raise
        raise clear from error
    others = [name for name in names if name != study]
    if study not in names and others:
        print(f"new study {study!r} in {storage_name(storage)}, which also holds {', '.join(map(repr, others))} "
              f"(--study NAME continues one of them)", file=sys.stderr)
    return opened


def _rdb_storage(url: str, interval: int, grace: int):
    """An RDB storage with heartbeats. Workers started together on a new database race to create its tables;
    the loser retries and finds them."""
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "mysql")):
        engine = {"connect_args": {"connect_timeout": 10}}  # an unreachable host fails in 10 s, not minutes
    else:
        engine = {}
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=interval, grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except sqlalchemy.exc.DBAPIError as error:
            if attempt == 4 or not _racing(error):
                raise
            time.sleep(0.5 + attempt)
            continue
        if url.startswith("sqlite"):
            _lock_when_begun(storage.engine)
        return storage


def _lock_when_begun(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE), SQLAlchemy's recipe
    for pysqlite. Python's sqlite3 begins a transaction only at the first write, so a check-then-write such as
    Optuna's claim of a waiting trial reads outside it, and two workers could both claim one trial: the second
    then fails with "Cannot tell a COMPLETE trial" (seen with two workers on a loaded machine)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def no_implicit_transactions(dbapi_connection, record):
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below emits the BEGIN

    @event.listens_for(engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners go


def _racing(error) -> bool:
    """Whether the error is another worker creating the same tables at the same moment."""
    import sqlalchemy.exc

    text = str(error.orig).lower()
    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in text or "locked" in text


def _storage_error(storage: str, error: Exception) -> InvalidSetting | None:
    """An InvalidSetting naming the storage, the database's own words and what to do; None for an error that is
    not the storage's."""
    import optuna
    import sqlalchemy.exc

    cause = error
    while isinstance(cause, (optuna.exceptions.OptunaError, ImportError)) and cause.__cause__ is not None:
        cause = cause.__cause__  # Optuna wraps the database's error (or the missing driver) in a generic one
    if not isinstance(cause, (sqlalchemy.exc.SQLAlchemyError, ImportError, optuna.exceptions.OptunaError,
                              RuntimeError, ValueError)):
        return None
    words = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    words = words[0].strip() if words else type(cause).__name__
    hint = next((hint for key, hint in HINTS if key in words.lower()), REACH)
    return InvalidSetting(f"cannot open the study storage {storage_name(storage)}: {words}; {hint}")


def prepare_study(study, storage: str, **attrs) -> None:
    """Refuse a study that another search made (another program, budget, samples or model), else record
    `attrs` on it: every worker must search the same objective."""
    import optuna

    where = f"the study {study.study_name!r} in {storage_name(storage)}"
    made = study.user_attrs
    foreign = study.directions != [optuna.study.StudyDirection.MAXIMIZE] or (
        "budget" not in made and study.get_trials(deepcopy=False))
    if foreign:
        raise InvalidSetting(f"{where} was not made by prunevlm calibrate (it has no calibration records, or it "
                             f"minimises): give another --study name, or another --storage")
    for key, value in attrs.items():
        if key in made and made[key] != value:
            raise InvalidSetting(f"{where} searches {key} {made[key]!r}, this run's is {value!r}: {_MISMATCH[key]}")
        if key not in made:
            study.set_user_attr(key, value)


_MISMATCH = {
    "budget": "give its --budget to continue it, or another --study name (the default name, vflowopt-T<budget>, "
              "keeps budgets apart)",
    "samples": "every worker must calibrate on the same samples (the same --data, --samples and --seed as the "
               "study's), or give another --study name",
    "layers": "the study was searched on a model of another depth: give the same --model, or another --study name",
}


def check_trials(study, storage: str, space: dict, samples: int) -> None:
    """Refuse a study whose finished trials lie outside the search space or score what no search can (a sum
    of `samples` cosines): the database was edited, and its best trial would be written as the config."""
    import optuna

    where = f"the study {study.study_name!r} in {storage_name(storage)}"
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        problem = None
        if set(trial.params) != set(space):
            problem = f"parameters {sorted(trial.params)}, not {sorted(space)}"
        else:
            for name, distribution in space.items():
                value = trial.params[name]
                if not (isinstance(value, float) and distribution.low <= value <= distribution.high):
                    problem = f"{name}={value!r}, outside the searched [{distribution.low:g}, {distribution.high:g}]"
                    break
        if problem is None and not (math.isfinite(trial.value) and abs(trial.value) <= samples + 1e-3):
            problem = f"the objective {trial.value!r}, beyond ±{samples} (the sum of {samples} cosines)"
        if problem:
            raise InvalidInput(f"{where}: trial {trial.number} holds {problem}; the study was edited or another "
                               f"search wrote it: give another --study name or a new --storage")
