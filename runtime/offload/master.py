"""Who owns a rank's fp32 master shard and optimizer state, and where they live.

The Engine steps through a `MasterOptimizer`: `step(grad=...)` updates the master and the
state wherever they are and leaves the updated parameters where the ZeRO stage publishes them
from; checkpoints read and write them through `checkpoint_tensors` / `load_checkpoint_tensors`
under the same names whatever the placement, so a checkpoint saved with offload loads without
it and the other way round.

- `ShardMaster` (offload none or cpu): the master is one host/device tensor and the state
  lives in the `FlatOptimizer`. With no offload it is the stage's device master. With cpu
  offload it is a host tensor (pinned when CUDA is present and `pin_memory` asks for it): the
  gradient shard is copied device -> host, the step runs on the host (cpu_adam), and the
  updated values are handed to the stage (`write_params`, host -> device). On a CPU-only
  machine the host is the device, so the stage's master is the host master and nothing is
  copied; the code path is the same.
- `NvmeMaster` (nvme.py): master and state in swap files, stepped tile by tile.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..optim import FlatOptimizer
from ..optim_runs import Run, update_runs
from ..zero import ZeroStage

MASTER = "master"
"""Checkpoint key of the master shard; optimizer state is under `optim.<name>`."""


class MasterOptimizer(ABC):
    """Steps one rank's fp32 master shard with its optimizer, wherever both live."""

    def __init__(self, *, zero: ZeroStage, optimizer: FlatOptimizer):
        self.zero, self.optimizer = zero, optimizer
        self.numel = zero.layout.numel
        self.device = zero.grad.device

    @abstractmethod
    def step(self, *, grad: torch.Tensor, runs: list[Run], keep: list[tuple[int, int]] = ()) -> None:
        """Update the master with `grad` (the stage's fp32 gradient shard, unscaled and clipped),
        run by run (optim_runs.py; `keep`: ranges left as they were); afterwards the stage's
        `publish` sends the new parameters."""

    @abstractmethod
    def read_master(self, offset: int, length: int) -> torch.Tensor:
        """Range [offset, offset + length) of the fp32 master, on the compute device."""

    @abstractmethod
    def write_master(self, offset: int, values: torch.Tensor) -> None:
        """Replace range [offset, offset + len(values)) of the fp32 master and hand it to the
        stage's parameters (`zeroplan.gathered(..., modifier_rank=r)`); the state is kept."""

    @abstractmethod
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """`master` and `optim.<name>` tensors for a checkpoint."""

    @abstractmethod
    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `checkpoint_tensors` returned; the stage's next `publish` sends it."""

    def close(self) -> None:
        """Release host buffers and remove swap files."""


def check_state(optimizer: FlatOptimizer, numel: int, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint's master and optimizer state match this run's shard and optimizer."""
    want = {MASTER: (numel,), **{f"optim.{n}": (numel,) for n in optimizer.state_names},
            **{f"optim.{n}": tuple(t.shape) for n, t in optimizer.counters().items()}}
    if set(want) != set(tensors):
        raise ValueError(f"optimizer state has {sorted(tensors)}, expected {sorted(want)}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")


class ShardMaster(MasterOptimizer):
    """The master as one tensor: the stage's device master (`master is zero.master`), or a host
    copy that the stage does not hold (cpu offload with a separate device)."""

    def __init__(self, *, master: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.master = master
        self._host_grad: torch.Tensor | None = None

    @property
    def on_stage(self) -> bool:
        return self.master is self.zero.master

    def step(self, *, grad, runs, keep=()) -> None:
        self.optimizer.begin_step()
        update_runs(self.optimizer, param=self.master, grad=self._local(grad), state=self.optimizer.state, runs=runs,
                    keep=keep)
        self.optimizer.end_step()
        if not self.on_stage:
            self.zero.write_params(0, self.master)

    def _local(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient where the master is: itself, or copied into a reused host buffer."""
        if grad.device == self.master.device:
            return grad
        if self._host_grad is None:
            self._host_grad = torch.empty_like(self.master, pin_memory=self.master.is_pinned())
        self._host_grad.copy_(grad, non_blocking=self.master.is_pinned())
        if grad.device.type == "cuda":
            torch.cuda.current_stream(grad.device).synchronize()
        return self._host_grad

    def read_master(self, offset, length) -> torch.Tensor:
        return self.master[offset:offset + length].to(self.device)

    def write_master(self, offset, values) -> None:
        target = self.master[offset:offset + values.numel()]
        target.copy_(values)
        self.zero.write_params(offset, target)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {MASTER: self.master, **{f"optim.{k}": v for k, v in self.optimizer.state_tensors().items()}}

    def load_checkpoint_tensors(self, tensors) -> None:
        check_state(self.optimizer, self.numel, tensors)
        self.master.copy_(tensors[MASTER])
        self.optimizer.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})
        if not self.on_stage:
            self.zero.write_params(0, self.master)
