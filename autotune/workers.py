"""`zeroplan autotune --workers N`: N tuner worker processes on this machine, one study.

Each worker is a process of its own running `tune` (so one that dies, kill -9 included, takes
only its trial with it: the others fail that trial by its heartbeat and run it again, tune.py).
The workers are bound to this process (runtime.lifeline), so none outlives the command; they
share the study through its storage, as workers on other nodes do when they run the same
`zeroplan autotune --storage URL` there, and the trials' folders through the results directory
(trial numbers are the study's, so no two workers write one folder). The results are written
once, from the shared study, after every worker has ended.

The workers are started with multiprocessing's spawn method: a fork of a process that has
opened database connections and threads (the storage's, the heartbeat's) is not safe.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Callable

from zeroplan.runtime.lifeline import bind_to_parent
from zeroplan.runtime.run_env import PARENT_ENV
from zeroplan.schemas import ClusterSpec, ModelSpec

from .tune import Tuner, TuneResult, TuneSettings, open_tuner_study, tune, tune_results


def tune_workers(*, workers: int, data: dict, model: ModelSpec, cluster: ClusterSpec, settings: TuneSettings,
                 notify: Callable[[str], None] | None = None) -> tuple[TuneResult, list[int]]:
    """Run `workers` tuner processes on one study, then write its results; the result and
    the exit status of each worker (0: it ended normally)."""
    tuner = Tuner(data=data, model=model, cluster=cluster, settings=settings)
    open_tuner_study(tuner, notify=notify)  # created once here, so that notices are shown once
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, name=f"zeroplan-tuner-{i}", daemon=True,
                             kwargs={"parent": os.getpid(), "data": data, "model": model, "cluster": cluster,
                                     "settings": settings}) for i in range(workers)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    study = open_tuner_study(tuner, notify=lambda _: None)
    return tune_results(study, tuner=tuner), [proc.exitcode or 0 for proc in procs]


def _worker(*, parent: int, data: dict, model: ModelSpec, cluster: ClusterSpec, settings: TuneSettings) -> None:
    """One worker: bound to the command that started it, tuning until the study is done."""
    os.environ[PARENT_ENV] = str(parent)
    bind_to_parent()
    tune(data=data, model=model, cluster=cluster, settings=settings, notify=lambda _: None)
