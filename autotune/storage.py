"""Where a study is stored: the URL, opening it, and making its first creation race-free.

A study lives in a SQLite file (the default, in the results directory) or on a database
server that several tuner workers share (`--storage postgresql://user@host/db`). Optuna
reaches PostgreSQL through SQLAlchemy, which needs a driver named in the URL; zeroplan's
`postgres` extra installs psycopg 3, so a plain `postgresql://` (or `postgres://`) URL is
mapped to `postgresql+psycopg://`; a URL naming its own driver is left as given.

Creating the storage's schema is not safe to race: Optuna's `RDBStorage` runs SQLAlchemy's
`create_all` (check, then create) and then inserts its version row, so two workers that open a
new database in the same instant fail with "table ... already exists" (SQLite) or a unique
violation on `pg_type` (PostgreSQL), and SQLite may answer "database is locked". The loser of
that race finds the schema made by the winner when it tries again, so `open_storage` retries
(CREATE_ATTEMPTS, a short random back-off) rather than taking a lock that a server storage on
another node could not share. Creating the study itself races safely already
(`create_study(load_if_exists=True)` loads the study a concurrent worker created).

Every message names the storage with its password masked.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
import warnings
from typing import Iterator

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from zeroplan.schemas import ConfigError, Problem

HEARTBEAT_S = 10
"""A running trial beats this often; one silent for 3 beats (its worker was killed) is marked
failed by the next worker that starts a trial, and run again once (RetryHeartbeatStaleTrialCallback)."""
CREATE_ATTEMPTS = 8
"""Tries at opening a storage whose schema another worker may be creating at the same time."""
_DRIVERLESS = re.compile(r"^postgres(ql)?://")


def storage_url(storage: str | None, *, results_dir) -> str:
    """The given URL, or a SQLite file in the results directory."""
    if storage:
        return storage
    results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(results_dir / 'study.db').resolve()}"


def sqlalchemy_url(url: str) -> str:
    """The URL SQLAlchemy is given: a driverless PostgreSQL URL names psycopg 3."""
    return _DRIVERLESS.sub("postgresql+psycopg://", url)


def masked(url: str) -> str:
    """The URL for a message: its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@contextlib.contextmanager
def readable_storage(url: str, *, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a storage that cannot be opened or read (SQLAlchemy's errors; `also`: a missing
    driver, an unparsable URL, a schema of another Optuna) into a ConfigError naming it."""
    try:
        yield
    except (SQLAlchemyError, *also) as e:
        raise ConfigError(_problem(url, e)) from e


def _problem(url: str, e: Exception) -> Problem:
    shown = masked(url)
    why = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
    if isinstance(e, ImportError) and not is_sqlite(url):
        return Problem("--storage", f"cannot open the study storage {shown}: its database driver is not installed "
                       f"({why})", given=shown, suggestion="pip install 'zeroplan[postgres]' (psycopg 3)")
    return Problem("--storage", f"cannot open the study storage {shown}: {type(e).__name__}: {why}",
                   given=shown, suggestion="give an Optuna storage URL (sqlite:///path/study.db, "
                   "postgresql://user:password@host/db) of a server that is running and reachable; move a "
                   "damaged study.db aside, or pass another --out")


def open_storage(storage: str, *, heartbeat_s: float = HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """The storage at `storage`, with the heartbeat that fails a dead worker's trials and runs
    each such trial once more; a schema another worker is creating is waited for (module
    docstring)."""
    with readable_storage(storage, also=(ImportError, ValueError, RuntimeError)), experimental_ok():
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        for attempt in range(CREATE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(sqlalchemy_url(storage), heartbeat_interval=max(1, int(heartbeat_s)),
                                                  grace_period=max(3, int(3 * heartbeat_s)),
                                                  heartbeat_stale_trial_callback=callback)
            except SQLAlchemyError as e:
                if attempt == CREATE_ATTEMPTS - 1 or not _creation_race(e):
                    raise
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
    raise AssertionError("unreachable")


def _creation_race(e: SQLAlchemyError) -> bool:
    """An error a concurrent creation of the same schema explains (module docstring)."""
    text = str(e).lower()
    return any(s in text for s in ("already exists", "database is locked", "duplicate key", "unique constraint"))


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for features we rely on on purpose:
    heartbeats, multivariate/grouped TPE and `enqueue_trial(skip_if_exists=...)`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
