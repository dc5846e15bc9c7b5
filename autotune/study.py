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

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna

from zeroplan.schemas.autotuning import PRUNERS, SAMPLERS

from .identity import differences, identity_digest
from .space import Dimension
from .storage import HEARTBEAT_S, experimental_ok, masked, open_storage, readable_storage, storage_url

__all__ = ["HEARTBEAT_S", "experimental_ok", "open_storage", "readable_storage", "storage_url", "open_identified_study",
           "open_study", "make_sampler", "make_pruner", "grid_space", "grid_size", "mark_worker",
           "fail_orphaned_trials", "study_name_for"]



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


def _tpe(*, dims: Sequence[Dimension], seed: int | None) -> optuna.samplers.BaseSampler:
    with experimental_ok():
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=4)


_SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda *, dims, seed: optuna.samplers.RandomSampler(seed=seed),
    "grid": lambda *, dims, seed: optuna.samplers.GridSampler(grid_space(dims), seed=seed),
    "nsga2": lambda *, dims, seed: optuna.samplers.NSGAIISampler(seed=seed),
}
"""How each of `schemas.autotuning.SAMPLERS` is built."""

_PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
"""How each of `schemas.autotuning.PRUNERS` is built."""


def make_sampler(name: str, *, dims: Sequence[Dimension], seed: int | None) -> optuna.samplers.BaseSampler:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return _SAMPLERS[name](dims=dims, seed=seed)


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
    if name not in _PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
    return _PRUNERS[name]()


def open_identified_study(*, storage: str, given_name: str | None, overwrite: bool, identity: dict[str, Any],
                          directions: Sequence[str], sampler: optuna.samplers.BaseSampler,
                          pruner: optuna.pruners.BasePruner, notify: Callable[[str], None],
                          heartbeat_s: float = HEARTBEAT_S) -> optuna.Study:
    """Resume the study of this identity, or open a new one beside those of other identities
    (`notify` says which, and what differs); see the module docstring. Workers of one identity
    started at once agree on its name and all join the one study."""
    digest = identity_digest(identity)
    rdb = open_storage(storage, heartbeat_s=heartbeat_s)
    studies = _studies(rdb, url=storage, awaiting=given_name or f"zeroplan-{digest[:12]}")
    taken = {name: identity_digest(ident) if ident else None for name, ident in studies.items()}
    name = study_name_for(given=given_name, digest=digest, taken=taken, overwrite=overwrite)
    others = [n for n, d in taken.items() if d != digest]
    if name not in taken and others and not overwrite:
        last = others[-1]
        what = "; ".join(differences(studies[last] or {}, identity))
        more = f" (and {len(others) - 1} other(s))" if len(others) > 1 else ""
        notify(f"{masked(storage)} holds study {last}{more} measured for something else ({what}); nothing of it is "
               f"reused: starting study {name} beside it (`zeroplan report DIR --study {last}` shows it)")
    study = open_study(storage=rdb, url=storage, name=name, directions=directions, sampler=sampler, pruner=pruner)
    if IDENTITY_ATTR not in study.user_attrs:
        study.set_user_attr(IDENTITY_ATTR, identity)
    return study


IDENTITY_WAIT_S = 5.0
"""How long a study found without its identity is given to get one: the worker that created it
records it a moment after creating it (Optuna cannot do both at once)."""


def _studies(rdb: optuna.storages.RDBStorage, *, url: str, awaiting: str) -> dict[str, dict | None]:
    """The storage's studies, name -> recorded identity. When the study named `awaiting` has
    none, it may be another worker's that is being created this instant: wait for its identity
    (IDENTITY_WAIT_S), so that workers started together do not open two studies."""
    deadline = time.monotonic() + IDENTITY_WAIT_S
    while True:
        with readable_storage(url):
            studies = {s.study_name: s.user_attrs.get(IDENTITY_ATTR) for s in rdb.get_all_studies()}
        if awaiting not in studies or studies[awaiting] is not None or time.monotonic() > deadline:
            return studies
        time.sleep(0.2)


def open_study(*, storage: optuna.storages.RDBStorage, url: str, name: str, directions: Sequence[str],
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study, or load it when it exists (resume, or another worker created it)."""
    # Optuna logs every failed trial with a traceback at WARNING; the tuner records the reason
    # and shows it in its progress line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with readable_storage(url):
        study = optuna.create_study(storage=storage, study_name=name, directions=list(directions),
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        study.get_trials(deepcopy=False)  # a truncated database fails here, not mid-study
    return study


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
