"""Measured step metrics: what the autotuner compares its predictions with.

- step time: wall clock from the first forward of a step to the end of its optimizer step,
  after synchronising the device (CUDA work is asynchronous);
- throughput: the plan's global batch (samples) and the tokens it carried per second;
- peak memory of this rank: the process's high-water mark (VmHWM from /proc/self/status on
  Linux; getrusage's ru_maxrss elsewhere, which on Linux would also count memory inherited
  across fork and exec from the launcher), plus `torch.cuda.max_memory_allocated` and
  `max_memory_reserved` on GPU;
- communication: calls and bytes per collective in the step (comm.CommsLogger).

`StepReporter` writes these per step for the tuner from any script (see its docstring).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.steps import StepRecord, SummaryRecord

from .run_env import MAX_STEPS_ENV, METRICS_ENV


def peak_rss_bytes() -> int:
    """This process image's peak resident memory in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak memory of this process in bytes, by kind."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepMeter:
    """Times optimizer steps and counts the tokens they consumed."""

    device: torch.device
    global_batch_size: int
    started: float | None = None
    tokens: int = 0
    times: list[float] = field(default_factory=list)
    last_tokens: int = 0

    def begin(self) -> None:
        if self.started is None:
            synchronize(self.device)
            self.started = time.perf_counter()
            self.tokens = 0

    def count_tokens(self, n: int) -> None:
        self.tokens += n

    def end(self) -> None:
        synchronize(self.device)
        if self.started is not None:
            self.times.append(time.perf_counter() - self.started)
        self.started = None
        self.last_tokens = self.tokens

    def summary(self) -> dict[str, float]:
        if not self.times:
            return {"steps_timed": 0}
        last = self.times[-1]
        out = {"steps_timed": len(self.times), "step_time_s": last,
               "mean_step_time_s": sum(self.times) / len(self.times),
               "samples_per_s": self.global_batch_size / last if last > 0 else 0.0}
        if self.last_tokens:
            out["tokens_per_s"] = self.last_tokens / last if last > 0 else 0.0
        return out


# -- metrics for the tuner from any training script ------------------------------------------

class TrialComplete(SystemExit):
    """Raised by `engine.step()` when $ZEROPLAN_MAX_STEPS optimizer steps are done.

    Like DeepSpeed's autotuner, which ends a profiled run from inside the engine once its
    profiling steps are done, a script needs no change to run as a trial: the exception is a
    SystemExit with status 0, so unless caught it ends the process quietly (no traceback) and
    `finally` blocks and `with` exits still run. The engine has already written the summary
    and closed its process group. Catch it (`except zeroplan.TrialComplete`) to do more
    before exiting; do not train on with the engine.
    """

    def __init__(self, steps: int):
        super().__init__(0)
        self.steps = steps


def gather_peaks(*, peak_bytes: int, group) -> list[int]:
    """Every rank's peak memory in `group` (a collective: every rank calls it)."""
    peak = torch.tensor([peak_bytes], dtype=torch.float64)
    peaks = [torch.zeros_like(peak) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(peaks, peak, group=group)
    return [int(p.item()) for p in peaks]


class StepReporter:
    """Per-step metrics for `zeroplan autotune`'s trial runner, from inside the Engine.

    Set up by `initialize` when $ZEROPLAN_METRICS or $ZEROPLAN_MAX_STEPS is set (`zeroplan train
    PLAN --steps N --metrics FILE -- script.py` sets both; run_env.py). Rank 0 writes a StepRecord
    (schemas/steps.py) after every optimizer step (steps from 1, the loss being
    engine.last_loss), and at the last step a SummaryRecord with every rank's peak memory; then
    `step()` raises TrialComplete.
    """

    def __init__(self, *, path: Path | None, max_steps: int | None, rank0: bool):
        self.path, self.max_steps, self.rank0 = path, max_steps, rank0
        self._times: list[float] = []
        if self.path is not None and rank0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    @classmethod
    def from_env(cls, *, rank: int) -> "StepReporter | None":
        path, steps = os.environ.get(METRICS_ENV), os.environ.get(MAX_STEPS_ENV)
        if not path and not steps:
            return None
        try:
            max_steps = int(steps) if steps else None
        except ValueError:
            max_steps = -1
        if max_steps is not None and max_steps < 1:
            raise ConfigError(Problem(f"${MAX_STEPS_ENV}", "must be a whole number >= 1", given=steps))
        return cls(path=Path(path) if path else None, max_steps=max_steps, rank0=rank == 0)

    def on_step(self, engine) -> None:
        """After an optimizer step (every rank): write its line; end the run at the last step."""
        line = StepRecord(step=engine.global_steps, loss=engine.last_loss, **engine.metrics())
        self._times.append(line.step_time_s)
        self._write(line)
        if self.max_steps is not None and engine.global_steps >= self.max_steps:
            peaks = gather_peaks(peak_bytes=line.peak_rss_bytes, group=None)  # every rank, all stages
            times = self._times[1:] or self._times  # the first step includes warm-up
            mean = sum(times) / len(times)
            self._write(SummaryRecord(steps=engine.global_steps, mean_step_time_s=mean,
                                      samples_per_s=engine.plan.batch.global_batch_size / mean if mean else 0.0,
                                      peak_rss_bytes_per_rank=peaks))
            engine.close()
            raise TrialComplete(engine.global_steps)

    def _write(self, record: StepRecord | SummaryRecord) -> None:
        if self.path is not None and self.rank0:
            with self.path.open("a") as f:
                f.write(record.to_line())
