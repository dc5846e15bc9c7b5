"""What every ZeRO stage shares: the trainable parameters, the fp32 master and gradient
shards, per-parameter gradient hooks, and the interface the Engine drives.

Engine -> stage calls, per optimizer step:
  forward_context() around each forward; begin_backward(boundary=...) and end_backward()
  around each backward; at the boundary the Engine reads `grad` (fp32 shard, averaged over
  dp ranks), steps the optimizer on `master`, then calls publish() (master -> model
  parameters) and zero_grad().
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch
from torch import nn

from ..comm import Collectives
from .comm import BucketReducer, gather_groups, gather_slots
from .layout import ShardLayout


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of parameters that train, each once (tied weights under the first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def module_order_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in module order, each module's own parameters together (stage 3)."""
    out, seen = [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def init_master(layout: ShardLayout, rank: int, device: torch.device) -> torch.Tensor:
    """This rank's fp32 shard of the current (full) parameters."""
    master = torch.zeros(layout.numel, dtype=torch.float32, device=device)
    for slot, p in zip(layout.slots, layout.params):
        flat = p.detach().reshape(-1).to(torch.float32)
        master[slot.offset:slot.offset + slot.chunk] = layout.chunk_of(flat, slot, rank)
    return master


class ZeroStage(ABC):
    """A ZeRO stage bound to one model. Built by `build_zero`; `__init__` only stores."""

    stage: int
    grad_norm_replicated = False
    """True when every rank holds the whole gradient (stage 0): the norm needs no all-reduce."""

    def __init__(self, *, model: nn.Module, layout: ShardLayout, coll: Collectives, master: torch.Tensor,
                 grad: torch.Tensor, param_dtype: torch.dtype, allgather_bucket_size: int, overlap: bool):
        self.model, self.layout, self.coll = model, layout, coll
        self.master, self.grad = master, grad
        self.param_dtype = param_dtype
        self.allgather_bucket_size = allgather_bucket_size
        self.overlap = overlap
        self.boundary = True
        self.reducer: BucketReducer | None = None
        self._hooks: list = []

    # -- hooks -------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the per-parameter post-accumulate-grad hooks."""
        for i, p in enumerate(self.layout.params):
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook_for(i)))

    def _hook_for(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self.on_grad(index, param)
        return hook

    @abstractmethod
    def on_grad(self, index: int, param: torch.Tensor) -> None:
        """A parameter's gradient for this backward is complete in `param.grad`."""

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- engine interface ------------------------------------------------------------------
    def forward_context(self):
        return contextlib.nullcontext()

    def begin_backward(self, *, boundary: bool) -> None:
        self.boundary = boundary
        self.reducer.reset()

    def end_backward(self) -> None:
        if self.reduces_now():
            self.reducer.flush()
            self.reducer.wait()

    def reduces_now(self) -> bool:
        return self.boundary

    def zero_grad(self) -> None:
        self.grad.zero_()

    @abstractmethod
    def publish(self) -> None:
        """Make the model's parameters equal the (updated) master weights."""

    def full_parameters(self) -> list[torch.Tensor]:
        """Every trainable parameter whole, fp32, on every rank (a collective)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.layout)

        def keep(i: int, full: torch.Tensor) -> None:
            out[i] = full.clone()

        for start, end in gather_groups(self.layout, self.allgather_bucket_size):
            gather_slots(layout=self.layout, coll=self.coll, shard=self.master, start=start, end=end,
                         async_op=False).finish(keep)
        return out

    def param_shard(self) -> torch.Tensor:
        """The master shard in the parameters' dtype (the master itself when that is fp32)."""
        return self.master if self.param_dtype == torch.float32 else self.master.to(self.param_dtype)

    def gather_into_model(self, ranges: list[tuple[int, int]]) -> None:
        """All-gather the updated shard for slot ranges into the model's parameters."""
        shard = self.param_shard()

        def write(i: int, full: torch.Tensor) -> None:
            self.layout.params[i].data.copy_(full)

        handles = [gather_slots(layout=self.layout, coll=self.coll, shard=shard, start=s, end=e,
                                async_op=self.overlap) for s, e in ranges]
        for h in handles:
            h.finish(write)
