"""What every ZeRO stage shares: the trainable parameters, the fp32 master and gradient
shards, per-parameter gradient hooks, and the interface the Engine drives.

Engine -> stage calls, per optimizer step:
  forward_context() around each forward; begin_backward(boundary=...) and end_backward()
  around each backward; at the boundary the Engine reads `grad` (fp32 shard, averaged over
  dp ranks), steps the optimizer on `master`, then calls publish() (master -> model
  parameters) and zero_grad().

When the optimizer is offloaded (runtime/offload), `master` is None: the fp32 master lives in
host memory or in swap files, and its owner hands each updated range to `write_params` before
`publish`. Stages 1-2 then publish from the model's own parameters (each rank's chunk of every
parameter is exactly its shard in the parameters' dtype), so no shard-sized copy stays on the
device; stage 3 publishes from its parameter store.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from zeroplan.compiler.shards import publish_gathers

from ..comm import Collectives, Pending
from .comm import BucketReducer, GatherHandle, gather_groups, gather_slots
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
    return layout.read_params(0, layout.numel, rank, dtype=torch.float32).to(device)


class ZeroStage(ABC):
    """A ZeRO stage bound to one model. Built by `build_zero`; `__init__` only stores."""

    stage: int
    grad_norm_replicated = False
    """True when every rank holds the whole gradient (stage 0): the norm needs no all-reduce."""

    def __init__(self, *, model: nn.Module, layout: ShardLayout, coll: Collectives, master: torch.Tensor | None,
                 grad: torch.Tensor, param_dtype: torch.dtype, allgather_bucket_size: int, overlap: bool):
        self.model, self.layout, self.coll = model, layout, coll
        self.master, self.grad = master, grad
        """`master`: the fp32 master shard on the device; None when the optimizer is offloaded."""
        self.rank = coll.rank if layout.world > 1 else 0
        self.param_dtype = param_dtype
        self.allgather_bucket_size = allgather_bucket_size
        self.overlap = overlap
        self.boundary = True
        self.reducer: BucketReducer | None = None
        self._hooks: list = []
        self._received = bytearray(len(layout))
        """Per slot: 1 once a backward since the last `take_received` produced its gradient."""

    # -- hooks -------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the per-parameter post-accumulate-grad hooks."""
        for i, p in enumerate(self.layout.params):
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook_for(i)))

    def _hook_for(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self._received[index] = 1
            self.on_grad(index, param)
        return hook

    def take_received(self) -> bytearray:
        """Which slots got a gradient on this rank since the last call (one byte each), and start
        counting again: a parameter no backward reached has no gradient, as torch's `.grad` None."""
        received, self._received = self._received, bytearray(len(self.layout))
        return received

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

    # -- whole parameters outside the forward (runtime/gathered.py) -------------------------
    def hold(self, indices: list[int]) -> None:
        """Keep these slots' parameters whole until `unhold` (stages 0-2: they always are)."""

    def unhold(self, indices: list[int]) -> None:
        """End one `hold` of these slots."""

    def saved_tensors_hooks(self):
        """What autograd saves of a parameter while a `hold` is open (stages 0-2: the tensor)."""
        return contextlib.nullcontext()

    def register_external(self, module: nn.Module, param: torch.Tensor) -> None:
        """`module`'s forward uses `param` too (stages 0-2: nothing to gather)."""

    def zero_grad(self) -> None:
        self.grad.zero_()

    @abstractmethod
    def publish(self) -> None:
        """Make the model's parameters equal the (updated) master weights."""

    def write_params(self, lo: int, values: torch.Tensor) -> None:
        """Updated master values of shard range [lo, lo + len(values)), for the next `publish`
        (offloaded optimizer only: a resident master is published as it is)."""
        self.layout.write_params(lo, values, self.rank)

    def full_parameters(self, *, read_master: Callable[[int, int], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every trainable parameter whole, fp32, on every rank (a collective).

        `read_master(offset, length)` returns that range of the fp32 master shard on the
        device (default: a slice of the resident master)."""
        read = read_master or self._resident_master
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.layout)

        def keep(i: int, full: torch.Tensor) -> None:
            out[i] = full.clone()

        for start, end in gather_groups(self.layout, self.allgather_bucket_size):
            gather_slots(layout=self.layout, coll=self.coll, part=read(*self.layout.span(start, end)),
                         start=start, end=end, async_op=False).finish(keep)
        return out

    def _resident_master(self, offset: int, length: int) -> torch.Tensor:
        return self.master[offset:offset + length]

    def publish_parts(self) -> Callable[[int, int], torch.Tensor]:
        """(offset, length) -> that range of this rank's shard in the parameters' dtype: what
        the all-gather of `publish` sends."""
        if self.master is None:
            return lambda offset, length: self.layout.read_params(offset, offset + length, self.rank,
                                                                  dtype=self.param_dtype)
        shard = self.master if self.param_dtype == torch.float32 else self.master.to(self.param_dtype)
        return lambda offset, length: shard[offset:offset + length]

    def gather_into_model(self, ranges: list[tuple[int, int]]) -> None:
        """All-gather the updated shard for slot ranges (all-gather buckets) into the model's
        parameters, as compiler.shards.publish_gathers cuts them: a bucket through a gather
        buffer, with `overlap_comm` all launched before any is written, else one at a time
        through one buffer (a fresh buffer per bucket costs a page fault per page on the CPU);
        where the collectives run per rank (gloo), a large rank-major parameter
        (compiler.shards.gathers_in_place) straight into its own storage, every such gather in
        flight at once: a call of its own, but no buffer and no copy back."""
        part = self.publish_parts()
        gathers = publish_gathers([slot.numel for slot in self.layout.slots], ranges, world=self.layout.world,
                                  per_rank=self.coll.per_rank)
        pending = [self._gather_in_place(g.start, part(*self.layout.span(g.start, g.end))) for g in gathers if g.in_place]
        staged = [(g.start, g.end) for g in gathers if not g.in_place]

        def write(i: int, full: torch.Tensor) -> None:
            self.layout.params[i].data.copy_(full)

        def launch(s: int, e: int, scratch: torch.Tensor | None = None) -> GatherHandle:
            return gather_slots(layout=self.layout, coll=self.coll, part=part(*self.layout.span(s, e)), start=s,
                                end=e, async_op=self.overlap, scratch=scratch)

        if self.overlap:
            for h in [launch(s, e) for s, e in staged]:
                h.finish(write)
        elif staged:
            longest = max(self.layout.span(s, e)[1] for s, e in staged)
            scratch = torch.empty(self.layout.world * longest, dtype=self.param_dtype, device=self.grad.device)
            for s, e in staged:
                launch(s, e, scratch).finish(write)
        for work in pending:
            work.wait()

    def _gather_in_place(self, index: int, values: torch.Tensor):
        """Launch the in-place all-gather of rank-major parameter `index`, this rank's chunk
        being `values`: written into its row of the parameter viewed [W, chunk], the other rows
        received (a non-contiguous parameter is gathered beside it and copied in)."""
        param, world = self.layout.params[index], self.layout.world
        whole = param.data.is_contiguous()
        rows = (param.data if whole else torch.empty_like(param.data, memory_format=torch.contiguous_format))
        rows = rows.view(world, -1)
        rows[self.rank].copy_(values)
        work = self.coll.all_gather_rows(rows, async_op=True)
        return work if whole else Pending([work], then=lambda: param.data.copy_(rows.view(param.shape)))
