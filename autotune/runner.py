"""Run one trial as a real subprocess, watch its per-step reports, and survive anything it does.

The child (normally `zeroplan train PLAN ... --metrics FILE`, which launches torchrun) appends
one JSON object per optimizer step to a metrics file, steps counted from 1, and may end with a
summary object (`"summary": true`, with every rank's peak memory):

    {"step": 3, "step_time_s": 0.41, "loss": 2.93, "samples_per_s": 19.5, "peak_rss_bytes": 123456}
    {"summary": true, "peak_rss_bytes_per_rank": [123456, 120000], ...}

Peak memory is the accelerator's reserved bytes when reported (`max_memory_reserved_bytes`),
else the process's peak RSS. When the run fails, `zeroplan train` appends what its ranks
reported (runtime/diagnose.py): which rank failed and why, and that rank's traceback:

    {"failure": true, "rank": 1, "kind": "crash", "cause": "rank 1: killed by SIGSEGV ...", "detail": "..."}

The parent polls that file; each new step goes to `on_step`, which returns True to prune
(Optuna's `trial.report` + `trial.should_prune`). The child is started as every child of
the tuner is (child.py: its own session, bound to this process): pruning, a timeout or a
failure stops its process group (SIGTERM: `zeroplan train` stops its ranks; SIGKILL after
child.KILL_GRACE_S), and when the tuner itself dies, kill -9 included, the trial ends with it.
Every outcome carries a reason and the failing rank's traceback (else the last lines of the
log), so a failed trial explains itself ("DeepSpeed's tuner says only 'model not runnable'").
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from zeroplan.runtime import procs

from . import child

_OOM_MARKERS = ("out of memory", "outofmemoryerror", "cannot allocate memory", "memoryerror")
_POLL_S = 0.2


@dataclass
class StepReport:
    step: int
    step_time_s: float
    loss: float | None = None
    samples_per_s: float | None = None
    peak_memory_bytes: int | None = None


@dataclass
class TrialOutcome:
    state: Literal["complete", "pruned", "failed"]
    reason: str = ""
    steps: list[StepReport] = field(default_factory=list)
    log_tail: str = ""
    wall_s: float = 0.0
    peak_memory_bytes: int | None = None
    """Largest peak over all ranks when the child wrote a summary, else over rank 0's steps."""
    failure: dict | None = None
    """What the child said about its failure (`zeroplan train`'s failure line), if it did."""


def _peak(record: dict) -> int | None:
    return record.get("max_memory_reserved_bytes") or record.get("peak_rss_bytes")


def _read_new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete lines appended since `offset` (a line being written is left for next time)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()], offset + end


def _step(record: dict) -> StepReport:
    return StepReport(step=int(record["step"]), step_time_s=float(record["step_time_s"]), loss=record.get("loss"),
                      samples_per_s=record.get("samples_per_s"), peak_memory_bytes=_peak(record))


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
    on_step: Callable[[StepReport], bool] = lambda _: False,
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
    told = outcome.failure or {}
    outcome.log_tail = told.get("detail") or procs.tail(log_path, lines=20)
    if outcome.state == "failed" and not outcome.reason:
        outcome.reason = told.get("cause") or _failure_reason(proc.returncode, outcome.log_tail)
    return outcome


def _watch(proc: subprocess.Popen, *, metrics: Path, timeout_s: float,
           on_step: Callable[[StepReport], bool], start: float) -> TrialOutcome:
    steps: list[StepReport] = []
    summary_peak: int | None = None
    failure: dict | None = None
    offset = 0
    while True:
        finished = proc.poll() is not None
        try:
            records, offset = _read_new_records(metrics, offset)
            new = [(_step(r), r.get("skipped", False)) for r in records
                   if not r.get("summary") and not r.get("failure")]
        except (ValueError, TypeError, KeyError) as e:
            return TrialOutcome("failed", f"unreadable step report: {e!r}", steps)
        for record in records:
            if record.get("summary") and record.get("peak_rss_bytes_per_rank"):
                summary_peak = max(record["peak_rss_bytes_per_rank"])
            if record.get("failure"):
                failure = record
        for report, skipped in new:
            steps.append(report)
            if report.loss is not None and not math.isfinite(report.loss) and not skipped:
                return TrialOutcome("failed", f"loss is {report.loss} at step {report.step}", steps)
            if on_step(report):
                return TrialOutcome("pruned", f"pruned after step {report.step}", steps)
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
