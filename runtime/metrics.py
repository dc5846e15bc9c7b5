"""Measured step metrics: what the autotuner compares its predictions with.

- step time: wall clock from the first forward of a step to the end of its optimizer step,
  after synchronising the device (CUDA work is asynchronous);
- throughput: the plan's global batch (samples) and the tokens it carried per second;
- peak memory of this rank: the process's high-water mark (VmHWM from /proc/self/status on
  Linux; getrusage's ru_maxrss elsewhere, which on Linux would also count memory inherited
  across fork and exec from the launcher), plus `torch.cuda.max_memory_allocated` and
  `max_memory_reserved` on GPU;
- communication: calls and bytes per collective in the step (comm.CommsLogger).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch


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
