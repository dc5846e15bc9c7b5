"""Collectives over one process group, each counted by a comms logger.

`Collectives` is what the ZeRO stages call instead of torch.distributed directly: it binds
the group (passed in, never global) and records every call in a `CommsLogger` under the
torch.distributed function name, the keys DeepSpeed's `comms_logger` reports
(`all_reduce`, `reduce_scatter_tensor`, `all_gather_into_tensor`, `broadcast`).

Bytes are the message size as DeepSpeed's logger counts it: the full (unsharded) buffer of
the collective, i.e. the input of an all-reduce or reduce-scatter and the output of an
all-gather.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Newer torch names the flat-tensor collectives *_single and deprecates the older names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommsLogger:
    """Calls and bytes per collective since the last `reset`."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, op: str, tensor: torch.Tensor) -> None:
        self.calls[op] += 1
        self.bytes[op] += tensor.numel() * tensor.element_size()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {op: {"count": self.calls[op], "bytes": self.bytes[op]} for op in sorted(self.calls)}

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


class Collectives:
    """torch.distributed collectives bound to one group, logged."""

    def __init__(self, *, group: dist.ProcessGroup, logger: CommsLogger):
        self.group = group
        self.logger = logger
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def close(self) -> None:
        """Drop the group reference (see ProcessGroups.close)."""
        self.group = None

    def all_reduce(self, tensor: torch.Tensor, *, op=dist.ReduceOp.SUM, async_op: bool = False):
        self.logger.record("all_reduce", tensor)
        return dist.all_reduce(tensor, op=op, group=self.group, async_op=async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = False):
        """Sum `inp` (size * out.numel(), rank-major) over ranks; this rank's slice into `out`."""
        self.logger.record("reduce_scatter_tensor", inp)
        if self.size == 1:
            out.copy_(inp)
            return None
        return _reduce_scatter_flat(out, inp, group=self.group, async_op=async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = False):
        """Concatenate every rank's `inp` (equal sizes: shards are padded) into `out`, rank-major."""
        self.logger.record("all_gather_into_tensor", out)
        if self.size == 1:
            out.copy_(inp)
            return None
        return _all_gather_flat(out, inp, group=self.group, async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0) -> None:
        self.logger.record("broadcast", tensor)
        if self.size > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src), group=self.group)

    def any_true(self, flag: bool, *, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any (e.g. an fp16 overflow)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a one-element fp32 tensor over ranks (in place) and return it."""
        self.all_reduce(value)
        return value
