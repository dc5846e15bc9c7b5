"""The Optuna study: storage, sampler and pruner, chosen by name.

The study lives in a SQLite file by default, or any Optuna RDB URL, and is always opened
with `load_if_exists=True`: a killed `zeroplan autotune` resumes where it stopped, and
several workers can share one study through a PostgreSQL URL. Nothing here deletes a study;
a fresh start (`overwrite`) opens a new study under a new name beside the old one.

A study is keyed by its identity (identity.py: config, model, world, cluster, version, space,
measurement), recorded in its user attributes. A study of the same identity resumes; one of
another identity is never reused: a new study opens beside it in the same storage (named
`zeroplan-<digest>`, or `<given name>-<digest>` when the given name is taken), with a notice
saying what differs. One storage with several studies is what Optuna users work with
(`optuna-dashboard`, `optuna.load_study(study_name=...)`, `zeroplan report --study`); a second
file would hide the first study from them.

A storage that cannot be opened or read (a bad URL, a file that is not an Optuna database, a
truncated one) is a ConfigError naming it. Each running trial records its worker (host, pid);
a resumed study fails at once the running trials whose worker on this host is dead (the tuner
was killed), rather than waiting for Optuna's heartbeat grace period (HEARTBEAT_S), which
still covers workers on other hosts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from sqlalchemy.exc import SQLAlchemyError

from zeroplan.schemas import ConfigError, Problem

from .identity import differences, identity_digest
from .space import Dimension

SAMPLERS = ("tpe", "random", "grid", "nsga2")


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for features we rely on on purpose:
    heartbeats, multivariate/grouped TPE and `enqueue_trial(skip_if_exists=...)`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
PRUNERS = ("median", "hyperband", "none")


def storage_url(storage: str | None, *, results_dir: Path) -> str:
    """The given URL, or a SQLite file in the results directory."""
    if storage:
        return storage
    results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(results_dir / 'study.db').resolve()}"


IDENTITY_ATTR = "zeroplan_identity"
"""Study user attribute: the identity (identity.py) its trials were measured under."""


def study_name_for(*, given: str | None, digest: str, taken: dict[str, str | None], overwrite: bool) -> str:
    """The name of the study of identity `digest`: the given name, or one derived from the
    digest; a given name that `taken` holds for another identity (or none recorded) gets the
    digest appended. `taken`: the storage's studies, name -> identity digest."""
    base = given or f"zeroplan-{digest[:12]}"
    if overwrite:
        return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
    if base not in taken or taken[base] == digest:
        return base
    return f"{base}-{digest[:12]}"


def make_sampler(name: str, *, dims: Sequence[Dimension], seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        with experimental_ok():
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=4)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(dims), seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def grid_space(dims: Sequence[Dimension]) -> dict[str, list]:
    """Every dimension as an explicit list of values (integer ranges are enumerated)."""
    space: dict[str, list] = {}
    for dim in dims:
        if dim.choices is not None:
            space[dim.name] = list(dim.choices)
        elif dim.log:
            values, v = [], dim.low
            while v <= dim.high:
                values.append(v)
                v *= 2
            space[dim.name] = values
        else:
            space[dim.name] = list(range(dim.low, dim.high + 1, dim.step or 1))
    return space


def grid_size(dims: Sequence[Dimension]) -> int:
    size = 1
    for values in grid_space(dims).values():
        size *= len(values)
    return size


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


HEARTBEAT_S = 10
"""A running trial beats this often; one silent for 3 beats (its tuner was killed) is marked
failed by the next worker, so a resumed study does not wait on it forever."""


def open_storage(storage: str) -> optuna.storages.RDBStorage:
    """The storage at `storage`, with the heartbeat that fails a dead worker's trials."""
    with readable_storage(storage, also=(ImportError, ValueError, RuntimeError)), experimental_ok():
        return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S)


def open_identified_study(*, storage: str, given_name: str | None, overwrite: bool, identity: dict[str, Any],
                          directions: Sequence[str], sampler: optuna.samplers.BaseSampler,
                          pruner: optuna.pruners.BasePruner, notify: Callable[[str], None]) -> optuna.Study:
    """Resume the study of this identity, or open a new one beside those of other identities
    (`notify` says which, and what differs); see the module docstring."""
    digest = identity_digest(identity)
    with readable_storage(storage):
        studies = {s.study_name: s.user_attrs.get(IDENTITY_ATTR) for s in open_storage(storage).get_all_studies()}
    taken = {name: identity_digest(ident) if ident else None for name, ident in studies.items()}
    name = study_name_for(given=given_name, digest=digest, taken=taken, overwrite=overwrite)
    others = [n for n, d in taken.items() if d != digest]
    if name not in taken and others and not overwrite:
        last = others[-1]
        what = "; ".join(differences(studies[last] or {}, identity))
        more = f" (and {len(others) - 1} other(s))" if len(others) > 1 else ""
        notify(f"{storage} holds study {last}{more} measured for something else ({what}); nothing of it is "
               f"reused: starting study {name} beside it (`zeroplan report DIR --study {last}` shows it)")
    study = open_study(storage=storage, name=name, directions=directions, sampler=sampler, pruner=pruner)
    if IDENTITY_ATTR not in study.user_attrs:
        study.set_user_attr(IDENTITY_ATTR, identity)
    return study


def open_study(*, storage: str, name: str, directions: Sequence[str], sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study, or load it when it exists (resume)."""
    # Optuna logs every failed trial with a traceback at WARNING; the tuner records the reason
    # and shows it in its progress line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rdb = open_storage(storage)
    with readable_storage(storage):
        study = optuna.create_study(storage=rdb, study_name=name, directions=list(directions),
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        study.get_trials(deepcopy=False)  # a truncated database fails here, not mid-study
    return study


@contextlib.contextmanager
def readable_storage(url: str, *, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a storage that cannot be opened or read (SQLAlchemy's errors; `also`: a missing
    driver, an unparsable URL, a schema of another Optuna) into a ConfigError naming it."""
    try:
        yield
    except (SQLAlchemyError, *also) as e:
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
        raise ConfigError(Problem("--storage", f"cannot open the study storage {url}: {type(e).__name__}: {why}",
                                  given=url, suggestion="give an Optuna storage URL (sqlite:///path/study.db, "
                                  "postgresql://...); move a damaged study.db aside, or pass another --out")) from e


WORKER_ATTR = "worker"
"""User attribute of a running trial: {"host", "pid"} of the tuner running it."""


def mark_worker(trial: optuna.Trial) -> None:
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail the running trials whose tuner on this host is dead; their numbers."""
    storage, failed = study._storage, []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR) or {}
        if worker.get("host") != socket.gethostname() or _alive(int(worker.get("pid", 0))):
            continue
        storage.set_trial_user_attr(trial._trial_id, "reason", f"its tuner (pid {worker['pid']}) ended while it ran "
                                    "(killed); failed when the study resumed")
        if storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
            failed.append(trial.number)
    return failed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: leave it to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
