"""Run one trial as a real subprocess, watch its per-step reports, and survive anything it does.

The child (normally `zeroplan train PLAN ... --metrics FILE`, which launches torchrun) appends
one record per line to a metrics file: a StepRecord per optimizer step, a SummaryRecord at the
end, and, when `zeroplan train` saw the run fail, a FailureRecord naming the failing rank, why,
and its traceback (schemas/steps.py defines them, with examples). Peak memory is the
accelerator's reserved bytes when reported, else the process's peak RSS.

The parent polls that file; each new step goes to `on_step`, which returns True to prune
(Optuna's `trial.report` + `trial.should_prune`). The child is started as every child of
the tuner is (child.py: its own session, bound to this process): pruning, a timeout or a
failure stops its process group (SIGTERM: `zeroplan train` stops its ranks; SIGKILL after
child.KILL_GRACE_S), and when the tuner itself dies, kill -9 included, the trial ends with it.
Every outcome carries a reason and the failing rank's traceback (else the last lines of the
log), so a failed trial explains itself ("DeepSpeed's tuner says only 'model not runnable'").
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from zeroplan.runtime import procs
from zeroplan.schemas import ConfigError
from zeroplan.schemas.steps import FailureRecord, MetricsTail, StepRecord, SummaryRecord

from . import child

_OOM_MARKERS = ("out of memory", "outofmemoryerror", "cannot allocate memory", "memoryerror")
_POLL_S = 0.2


@dataclass
class TrialOutcome:
    state: Literal["complete", "pruned", "failed"]
    reason: str = ""
    steps: list[StepRecord] = field(default_factory=list)
    log_tail: str = ""
    wall_s: float = 0.0
    peak_memory_bytes: int | None = None
    """Largest peak over all ranks when the child wrote a summary, else over rank 0's steps."""
    failure: FailureRecord | None = None
    """What the child said about its failure (`zeroplan train`'s failure line), if it did."""


def _failure_reason(returncode: int, log_tail: str) -> str:
    """A child that did not say why it failed (not `zeroplan train`): its status and log."""
    if any(marker in log_tail.lower() for marker in _OOM_MARKERS):
        return f"out of memory (exit {returncode})"
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"crashed (exit {returncode})"


def run_trial(
    *,
    command: Sequence[str],
    metrics: Path,
    workdir: Path,
    timeout_s: float,
    on_step: Callable[[StepRecord], bool] = lambda _: False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> TrialOutcome:
    """Run `command` in `cwd` (default `workdir`, which receives `trial.log`); it writes step
    reports to `metrics`."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "trial.log"
    metrics.unlink(missing_ok=True)
    start = time.monotonic()
    with log_path.open("wb") as log:
        proc = child.start(command, env=env, cwd=cwd or workdir, stdout=log, stderr=subprocess.STDOUT)
        try:
            outcome = _watch(proc, metrics=metrics, timeout_s=timeout_s, on_step=on_step, start=start)
        finally:
            child.stop(proc)
    outcome.wall_s = time.monotonic() - start
    told = outcome.failure
    outcome.log_tail = (told and told.detail) or procs.tail(log_path, lines=20)
    if outcome.state == "failed" and not outcome.reason:
        outcome.reason = (told and told.cause) or _failure_reason(proc.returncode, outcome.log_tail)
    return outcome


def _watch(proc: subprocess.Popen, *, metrics: Path, timeout_s: float,
           on_step: Callable[[StepRecord], bool], start: float) -> TrialOutcome:
    steps: list[StepRecord] = []
    summary_peak: int | None = None
    failure: FailureRecord | None = None
    tail = MetricsTail(metrics)
    while True:
        finished = proc.poll() is not None
        try:
            records = tail.read_new()
        except ConfigError as e:
            return TrialOutcome("failed", f"unreadable step report: {e}", steps)
        for record in records:
            if isinstance(record, SummaryRecord):
                summary_peak = record.peak_memory_bytes or summary_peak
            elif isinstance(record, FailureRecord):
                failure = record
            else:
                steps.append(record)
                if record.loss is not None and not math.isfinite(record.loss) and not record.skipped:
                    return TrialOutcome("failed", f"loss is {record.loss} at step {record.step}", steps)
                if on_step(record):
                    return TrialOutcome("pruned", f"pruned after step {record.step}", steps)
        if finished:
            if proc.returncode != 0:
                return TrialOutcome("failed", "", steps, failure=failure)
            if not steps:
                return TrialOutcome("failed", "finished without reporting a step", steps)
            peaks = [s.peak_memory_bytes for s in steps if s.peak_memory_bytes]
            return TrialOutcome("complete", "", steps, peak_memory_bytes=summary_peak or max(peaks, default=None))
        if time.monotonic() - start > timeout_s:
            return TrialOutcome("failed", f"timed out after {timeout_s:g} s "
                                f"({len(steps)} step(s) reported)", steps)
        time.sleep(_POLL_S)
