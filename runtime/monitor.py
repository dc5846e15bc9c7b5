"""Training monitors: what DeepSpeed's `tensorboard`, `csv_monitor` and `wandb` blocks write,
from the plan's `monitors` section, on rank 0, after every optimizer step; and DeepSpeed's
`flops_profiler`, which every rank runs (runtime/flops.py).

Events are (name, value, step) with DeepSpeed's names and x-axis, the global sample count
(optimizer steps x global batch):
    Train/Samples/train_loss                  the step's loss, averaged over its micro-batches
                                              and the dp ranks (engine.last_loss)
    Train/Samples/lr                          the learning rate the step used
    Train/Samples/loss_scale                  fp16 only
    Train/Samples/elapsed_time_ms_forward     wall_clock_breakdown only: the step's forwards,
    Train/Samples/elapsed_time_ms_backward    backwards (gradient reduction included) and
    Train/Samples/elapsed_time_ms_step        optimizer step, in ms (a pipeline: _schedule and _step)
and zeroplan's own, under the same prefix: step_time_ms, samples_per_s, peak_memory_bytes
(this rank's high-water mark) and comm_bytes/<collective> (bytes this rank sent in the step).

Backends (one module-sized class each, `MonitorBackend`): TensorBoard through torch's
SummaryWriter into `output_path/job_name`; CSV with DeepSpeed's layout, one file per event
named after it with '/' and ' ' as '_', rows `step,<last part of the name>`; Weights & Biases
through `wandb.init(project, group, entity=team)` (a missing login is a ConfigError naming the
block; WANDB_MODE=offline writes the run locally).
"""

from __future__ import annotations

import contextlib
import csv
from collections import defaultdict
import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.plan import MonitorOutput, MonitorsPlan, WandbPlan

from .flops import FlopsProfiler
from .metrics import synchronize

Event = tuple[str, float, int]
PREFIX = "Train/Samples/"


class MonitorBackend(ABC):
    @abstractmethod
    def write_events(self, events: list[Event]) -> None: ...

    def close(self) -> None:
        """Flush and release files or runs."""


def _job_dir(out: MonitorOutput) -> Path:
    path = Path(out.output_path or ".") / out.job_name
    path.mkdir(parents=True, exist_ok=True)
    return path


class TensorBoardMonitor(MonitorBackend):
    def __init__(self, *, output: MonitorOutput):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(_job_dir(output)))

    def write_events(self, events: list[Event]) -> None:
        for name, value, step in events:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CsvMonitor(MonitorBackend):
    def __init__(self, *, output: MonitorOutput):
        self.directory = _job_dir(output)
        self._started: set[Path] = set()

    def write_events(self, events: list[Event]) -> None:
        for name, value, step in events:
            path = self.directory / (name.replace("/", "_").replace(" ", "_") + ".csv")
            fresh = path not in self._started
            with path.open("w" if fresh else "a", newline="") as f:
                writer = csv.writer(f)
                if fresh:
                    writer.writerow(["step", name.rsplit("/", 1)[-1]])
                writer.writerow([step, value])
            self._started.add(path)


class WandbMonitor(MonitorBackend):
    def __init__(self, *, plan: WandbPlan):
        import wandb

        try:
            self.run = wandb.init(project=plan.project, group=plan.group, entity=plan.team)
        except Exception as e:  # wandb raises its own errors (no login, no network) at init
            raise ConfigError(Problem("wandb.enabled", f"cannot start a W&B run: {e}", given=True,
                                      suggestion="run `wandb login`, or set WANDB_MODE=offline to log locally, "
                                      "or set wandb.enabled false")) from e

    def write_events(self, events: list[Event]) -> None:
        if events:  # one history row per step: every event of a step shares its x value
            self.run.log({name: value for name, value, _ in events}, step=events[0][2])

    def close(self) -> None:
        self.run.finish()


def build_backends(monitors: MonitorsPlan) -> list[MonitorBackend]:
    """The plan's monitors, for rank 0 (ConfigError naming the block if a client is missing)."""
    out: list[MonitorBackend] = []
    if monitors.tensorboard is not None:
        _require("tensorboard")
        out.append(TensorBoardMonitor(output=monitors.tensorboard))
    if monitors.csv is not None:
        out.append(CsvMonitor(output=monitors.csv))
    if monitors.wandb is not None:
        _require("wandb")
        out.append(WandbMonitor(plan=monitors.wandb))
    return out


def _require(package: str) -> None:
    """The client of the `package` block (tensorboard, wandb) must import on this node too:
    the plan may have been compiled on another machine."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ConfigError(Problem(f"{package}.enabled", f"the plan writes {package} events but the {package} "
                                  "package is not installed here", given=True,
                                  suggestion=f"pip install 'zeroplan[monitors]' (or {package}) on every node"))


class StepTimers:
    """wall_clock_breakdown: time spent in each phase of one optimizer step, summed over its
    micro-steps (device synchronised at each edge): forward, backward and step; a pipeline
    engine, whose schedule interleaves forwards and backwards, times it as `schedule`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.elapsed: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.elapsed[name] += time.perf_counter() - start

    def take_ms(self) -> dict[str, float]:
        """The step's totals in ms; starts the next step from zero."""
        out = {k: v * 1000 for k, v in self.elapsed.items()}
        self.elapsed.clear()
        return out


def step_events(engine, *, loss: float | None, timers: dict[str, float] | None) -> list[Event]:
    """The events of the step `engine` just took (see the module docstring)."""
    samples = engine.global_steps * engine.plan.batch.global_batch_size
    events: list[tuple[str, float]] = []
    if loss is not None:
        events.append(("train_loss", loss))
    events.append(("lr", engine.last_lr))
    if engine.scaler.check_overflow:
        events.append(("loss_scale", engine.scaler.loss_scale))
    for phase, ms in (timers or {}).items():
        events.append((f"elapsed_time_ms_{phase}", ms))
    metrics = engine.metrics()
    if "step_time_s" in metrics:
        events += [("step_time_ms", metrics["step_time_s"] * 1000), ("samples_per_s", metrics["samples_per_s"])]
    events.append(("peak_memory_bytes", metrics["peak_rss_bytes"]))
    events += [(f"comm_bytes/{op}", c["bytes"]) for op, c in sorted(engine.last_comms.items())]
    return [(PREFIX + name, float(value), samples) for name, value in events]


def log_lines(engine, *, timers: dict[str, float] | None) -> list[str]:
    """What rank 0 prints every `steps_per_print` steps, as DeepSpeed's engine does: the timers
    (`wall_clock_breakdown`) and the step's collectives (`comms_logger`)."""
    lines, step = [], engine.global_steps
    if timers is not None:
        lines.append(f"[step {step}] time (ms) | " + " | ".join(f"{k}: {v:.2f}" for k, v in timers.items()))
    if engine.print_comms:
        ops = " | ".join(f"{op}: {c['count']} calls, {c['bytes'] / 2**20:.2f} MiB"
                         for op, c in sorted(engine.last_comms.items()))
        lines.append(f"[step {step}] comms | {ops or 'none'}")
    return lines


class Monitors:
    """The monitors of one rank: the event writers (rank 0 only) and the FLOPs profiler (every
    rank counts, rank 0 reports; runtime/flops.py). `__init__` stores."""

    def __init__(self, *, backends: list[MonitorBackend], flops: FlopsProfiler | None = None):
        self.backends = backends
        self.flops = flops

    @classmethod
    def from_plan(cls, monitors: MonitorsPlan, *, rank: int) -> "Monitors":
        backends = build_backends(monitors) if rank == 0 else []
        flops = None
        if monitors.flops_profiler is not None:
            flops = FlopsProfiler(plan=monitors.flops_profiler, rank=rank)
            flops.arm(steps_done=0)
        return cls(backends=backends, flops=flops)

    def on_step(self, engine, *, timers: dict[str, float] | None) -> None:
        if self.flops is not None:
            self.flops.on_step(engine, timers=timers)
        if self.backends:
            events = step_events(engine, loss=engine.last_loss, timers=timers)
            for backend in self.backends:
                backend.write_events(events)

    def close(self) -> None:
        if self.flops is not None:
            self.flops.close()
        for backend in self.backends:
            backend.close()
        self.backends = []


__all__ = ["CsvMonitor", "MonitorBackend", "Monitors", "StepTimers", "TensorBoardMonitor", "WandbMonitor",
           "log_lines", "step_events"]
