"""The interface every benchmarked system implements, and the loop pieces they share.

A system is built inside one rank process after torch.distributed is initialised (gloo):
`setup` receives the freshly built model (identical on every rank of every system) and the
workload; `train_step` runs one optimizer step over this rank's micro-batches and returns
the mean loss of those micro-batches (a detached scalar tensor).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ..workload import Workload


class System(ABC):
    name: ClassVar[str]
    """Stable id used on the command line and in result files (e.g. `zeroplan-z2`)."""
    sharding: ClassVar[str]
    """What it shards, in ZeRO terms: `stage 0` (nothing) ... `stage 3` (parameters too)."""
    build_on_meta: ClassVar[bool] = False
    """Whether the worker builds the model on the meta device, for `setup` to materialise."""

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this system cannot run here (a peer that is not installed), or None."""
        return None

    @classmethod
    def env(cls) -> dict[str, str]:
        """Extra environment variables its rank processes need."""
        return {}

    @classmethod
    def version(cls) -> str:
        return torch.__version__

    @abstractmethod
    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        """Wrap `model` and build the optimizer."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step; the mean loss of this rank's micro-batches."""

    def close(self) -> None:
        """Release hooks or groups the system created (not the default process group)."""

    def results(self) -> dict:
        """Figures of its own the worker adds to this rank's result (after the steps)."""
        return {}


def stage_variant(base: type, *, prefix: str, stage: int, offload: str = "none") -> type:
    """A subclass of `base` fixed to one ZeRO stage and offload device, named `{prefix}-z{stage}[-offload-X]`."""
    suffix = "" if offload == "none" else f"-offload-{offload}"
    return type(f"{base.__name__}Z{stage}", (base,), {"name": f"{prefix}-z{stage}{suffix}", "stage": stage,
                                                       "offload": offload, "sharding": f"stage {stage}"})


def adamw(params, workload: Workload) -> torch.optim.AdamW:
    """torch's AdamW as every peer uses it: the workload's hyper-parameters, fused (one pass on CPU,
    the same kernel the compiler picks for zeroplan on CPU, `kernels.optimizer: torch_fused`)."""
    return torch.optim.AdamW(params, lr=workload.lr, betas=workload.betas, eps=workload.eps,
                             weight_decay=workload.weight_decay, fused=True)


def accumulate_and_step(*, model: nn.Module, optimizer: torch.optim.Optimizer, workload: Workload,
                        micro_batches: list[dict[str, torch.Tensor]], no_sync) -> torch.Tensor:
    """The plain PyTorch step: backward of loss / n per micro-batch (gradient sync skipped on all
    but the last through `no_sync()`), clip the global norm, step, drop the gradients."""
    total = torch.zeros(())
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        ctx = no_sync() if i < n - 1 else contextlib.nullcontext()
        with ctx:
            loss = model(**batch)
            (loss / n).backward()
        total += loss.detach()
    if workload.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), workload.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n


def engine_train_step(engine, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """DeepSpeed's loop, which zeroplan's Engine shares: backward scales by 1/accumulation and
    step() acts at the accumulation boundary only. Returns the mean micro-batch loss."""
    total = None
    for batch in micro_batches:
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    return total / len(micro_batches)
