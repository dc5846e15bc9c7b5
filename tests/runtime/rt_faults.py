"""A user model (`zeroplan train --model rt_faults.py:build`) whose batch function injects one
fault, chosen by $ZP_FAULT = "kind:rank:index": on that rank, at that micro-batch index (with
one micro-batch per step, index k is step k + 1):

- nan: the batch's first input is nan (one bad micro-batch on one rank);
- hang: the rank sleeps (stuck outside any collective, so the others wait in one);
- segv: the rank dereferences a null pointer (SIGSEGV);
- kill: the rank SIGKILLs itself (as kill -9 or the kernel's OOM killer would);
- oom: the rank's address space is capped (RLIMIT_AS) and it allocates past the cap;
- slow: every batch of every rank takes 1 s (a run that is still going when it is killed).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time

import torch
import torch.distributed as dist
from torch import nn


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, y):
        return (self.net(x) - y).pow(2).mean()


def _inject(kind: str) -> None:
    if kind == "hang":
        time.sleep(600)
    elif kind == "segv":
        ctypes.string_at(0)
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "oom":
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 256 * 2**20, resource.RLIM_INFINITY))
        torch.ones(2**30, dtype=torch.uint8)


def build():
    kind, rank, index = (os.environ.get("ZP_FAULT", "none:-1:-1").split(":") + ["-1", "-1"])[:3]
    torch.manual_seed(0)

    def get_batch(micro_batch_size: int, i: int):
        g = torch.Generator().manual_seed(1000 * dist.get_rank() + i)
        x, y = torch.randn(micro_batch_size, 8, generator=g), torch.randn(micro_batch_size, 1, generator=g)
        if kind == "slow":
            time.sleep(1)
        if dist.get_rank() == int(rank) and i == int(index):
            if kind == "nan":
                x[0, 0] = float("nan")
            _inject(kind)
        return {"x": x, "y": y}

    return Regression(), get_batch
