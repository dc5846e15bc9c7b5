"""The Optuna study: storage, sampler and pruner, chosen by name.

The study lives in a SQLite file by default, or any Optuna RDB URL, and is always opened
with `load_if_exists=True`: a killed `zeroplan autotune` resumes where it stopped, and
several workers can share one study through a PostgreSQL URL. Nothing here deletes a study;
a fresh start (`overwrite`) opens a new study under a new name beside the old one.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Sequence

import optuna

from .space import Dimension

SAMPLERS = ("tpe", "random", "grid", "nsga2")
PRUNERS = ("median", "hyperband", "none")


def storage_url(storage: str | None, *, results_dir: Path) -> str:
    """The given URL, or a SQLite file in the results directory."""
    if storage:
        return storage
    results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(results_dir / 'study.db').resolve()}"


def study_name_for(config_data: dict, *, given: str | None, overwrite: bool) -> str:
    """The given name, or one derived from the config, so the same config resumes its study."""
    if given:
        base = given
    else:
        digest = hashlib.sha256(repr(sorted(config_data.items())).encode()).hexdigest()[:10]
        base = f"zeroplan-{digest}"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}" if overwrite else base


def make_sampler(name: str, *, dims: Sequence[Dimension], seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
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


def open_study(*, storage: str, name: str, directions: Sequence[str], sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study, or load it when it exists (resume)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # heartbeats are marked experimental since Optuna 2.9; we rely on them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S)
    return optuna.create_study(storage=rdb, study_name=name, directions=list(directions),
                               sampler=sampler, pruner=pruner, load_if_exists=True)
