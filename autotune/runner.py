"""Run one trial as a real subprocess, watch its per-step reports, and survive anything it does.

The child (normally `zeroplan train PLAN ... --metrics FILE`, which launches torchrun) appends
one JSON object per optimizer step to a metrics file:

    {"step": 3, "step_time_s": 0.41, "loss": 2.93, "samples_per_s": 19.5, "peak_memory_bytes": 123456}

The parent polls that file; each new step goes to `on_step`, which returns True to prune
(Optuna's `trial.report` + `trial.should_prune`). The child runs in its own session, so
pruning, a timeout or a failure kills the whole process group: torchrun's workers included,
no orphan is left behind. Every outcome carries a reason and the last lines of the log, so
a failed trial explains itself ("DeepSpeed's tuner says only 'model not runnable'").
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

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


def _read_new_steps(path: Path, offset: int) -> tuple[list[StepReport], int]:
    """Complete lines appended since `offset` (a line being written is left for next time)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    steps = []
    for line in chunk[:end].splitlines():
        if line.strip():
            record = json.loads(line)
            steps.append(StepReport(**{k: record.get(k) for k in StepReport.__dataclass_fields__}))
    return steps, offset + end


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_bytes()[-16384:].decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _kill_group(proc: subprocess.Popen, *, grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader exited; make sure no worker in its group survives it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _failure_reason(returncode: int, log_tail: str) -> str:
    lowered = log_tail.lower()
    if any(marker in lowered for marker in _OOM_MARKERS) or returncode in (-signal.SIGKILL, 137):
        return f"out of memory (exit {returncode})"
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"crashed (exit {returncode})"


def run_trial(
    *,
    command: Sequence[str],
    workdir: Path,
    timeout_s: float,
    on_step: Callable[[StepReport], bool] = lambda _: False,
    env: dict[str, str] | None = None,
) -> TrialOutcome:
    """Run `command` in `workdir` (which receives `metrics.jsonl` and `trial.log`).

    The command must write its step reports to the path in $ZEROPLAN_METRICS.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    metrics, log_path = workdir / "metrics.jsonl", workdir / "trial.log"
    metrics.unlink(missing_ok=True)
    child_env = {**os.environ, **(env or {}), "ZEROPLAN_METRICS": str(metrics)}
    start = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(command), cwd=workdir, env=child_env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            outcome = _watch(proc, metrics=metrics, timeout_s=timeout_s, on_step=on_step, start=start)
        finally:
            _kill_group(proc)
    outcome.log_tail = _tail(log_path)
    outcome.wall_s = time.monotonic() - start
    if outcome.state == "failed" and not outcome.reason:
        outcome.reason = _failure_reason(proc.returncode, outcome.log_tail)
    return outcome


def _watch(proc: subprocess.Popen, *, metrics: Path, timeout_s: float,
           on_step: Callable[[StepReport], bool], start: float) -> TrialOutcome:
    steps: list[StepReport] = []
    offset = 0
    while True:
        finished = proc.poll() is not None
        try:
            new, offset = _read_new_steps(metrics, offset)
        except (ValueError, TypeError) as e:
            return TrialOutcome("failed", f"unreadable step report: {e}", steps)
        for report in new:
            steps.append(report)
            if report.loss is not None and not math.isfinite(report.loss):
                return TrialOutcome("failed", f"loss is {report.loss} at step {report.step}", steps)
            if on_step(report):
                return TrialOutcome("pruned", f"pruned after step {report.step}", steps)
        if finished:
            if proc.returncode != 0:
                return TrialOutcome("failed", "", steps)
            if not steps:
                return TrialOutcome("failed", "finished without reporting a step", steps)
            return TrialOutcome("complete", "", steps)
        if time.monotonic() - start > timeout_s:
            return TrialOutcome("failed", f"timed out after {timeout_s:g} s "
                                f"({len(steps)} step(s) reported)", steps)
        time.sleep(_POLL_S)
