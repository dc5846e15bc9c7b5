"""A live progress line for a study: trials done, pruned, failed, and the best so far."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _summary(study: optuna.Study) -> str:
    states = [t.state for t in study.trials]
    done = states.count(optuna.trial.TrialState.COMPLETE)
    pruned = states.count(optuna.trial.TrialState.PRUNED)
    failed = states.count(optuna.trial.TrialState.FAIL)
    best = ""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete and len(study.directions) == 1:
        best = f", best {study.best_value:.3g} (trial {study.best_trial.number})"
    return f"{done} complete, {pruned} pruned, {failed} failed{best}"


@contextlib.contextmanager
def live_progress(*, total: int) -> Iterator[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]]:
    """Yield an Optuna callback that advances a rich progress bar on stderr.

    On a terminal the bar redraws in place; in a log (CI, nohup) rich prints plain lines.
    """
    console = Console(file=sys.stderr)
    columns = (TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=total)

        def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            reason = trial.user_attrs.get("reason", "")
            if reason and trial.state != optuna.trial.TrialState.COMPLETE:
                progress.console.print(f"trial {trial.number} {trial.state.name.lower()}: {reason}")
            progress.update(task, advance=1, description=_summary(study))

        yield callback
