"""Collectives over one process group, each counted by a comms logger.

`Collectives` is what the ZeRO stages, tensor and pipeline parallelism call instead of
torch.distributed directly: it binds the group (passed in, never global) and records every
call in a `CommsLogger` under the torch.distributed function name, the keys DeepSpeed's
`comms_logger` reports (`all_reduce`, `reduce_scatter_tensor`, `all_gather_into_tensor`,
`broadcast`), and `send` / `recv` for the pipeline's point-to-point messages. Peers and roots
are ranks within the group; Collectives maps them to global ranks.

Bytes are the message size as DeepSpeed's logger counts it: the full (unsharded) buffer of
the collective, i.e. the input of an all-reduce or reduce-scatter and the output of an
all-gather; a send's or receive's tensor. Objects (`all_gather_object`) are counted as calls
with no bytes: torch pickles them out of sight.

On gloo the flat reduce-scatter and all-gather run as one `reduce` / `broadcast` per rank, each
on that rank's contiguous slice, all launched before any is waited. Gloo implements the flat
forms by staging through copies of the whole buffer: measured on 2 and 4 CPU ranks
(bench/collectives.py), the per-rank forms move the same bytes 2-3x faster on buffers of a
few million elements and are not slower on small ones. The results
are the same values (a broadcast copies exactly; a sum of two ranks does not depend on the
order); NCCL keeps its native collectives.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zeroplan.compiler.shards import collectives_per_rank

# Newer torch names the flat-tensor collectives *_single and deprecates the older names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommsLogger:
    """Calls and bytes per collective since the last `reset`."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, op: str, tensor: torch.Tensor | None) -> None:
        """One call of `op` moving `tensor` (None: an object, counted without bytes)."""
        self.calls[op] += 1
        self.bytes[op] += 0 if tensor is None else tensor.numel() * tensor.element_size()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {op: {"count": self.calls[op], "bytes": self.bytes[op]} for op in sorted(self.calls)}

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


class Pending:
    """Several collectives in flight (each anything with `wait`), waited as one; `then` runs
    once all are done."""

    def __init__(self, works: list, then=None):
        self.works, self.then = works, then

    def wait(self) -> None:
        """Raises torch.distributed.DistError for a collective that failed: a gloo work raises a
        bare RuntimeError ("Application timeout caused pair closure"), from no torch.distributed
        frame, which runtime/failure.py could not tell from any other error."""
        for work in self.works:
            try:
                work.wait()
            except dist.DistError:
                raise
            except RuntimeError as e:
                raise dist.DistError(str(e)) from e
        self.works = []
        if self.then is not None:
            then, self.then = self.then, None
            then()


def _settle(pending: Pending, *, async_op: bool) -> Pending | None:
    """`pending` itself when the caller waits on it later, else waited now (None)."""
    if async_op:
        return pending
    pending.wait()
    return None


class PrefixedLogger:
    """Records into another comms logger under "<prefix>.<op>" (tp, pp and world collectives
    beside dp's, which are unprefixed)."""

    def __init__(self, logger: CommsLogger, prefix: str):
        self.logger, self.prefix = logger, prefix

    def record(self, op: str, tensor: torch.Tensor | None) -> None:
        self.logger.record(f"{self.prefix}.{op}", tensor)


class Collectives:
    """torch.distributed collectives bound to one group, logged."""

    def __init__(self, *, group: dist.ProcessGroup, logger: CommsLogger):
        self.group = group
        self.logger = logger
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.per_rank = collectives_per_rank(dist.get_backend(group))
        """Whether reduce-scatter and all-gather run as one reduce / broadcast per rank (above)."""

    def close(self) -> None:
        """Drop the group reference (see ProcessGroups.close)."""
        self.group = None

    def all_reduce(self, tensor: torch.Tensor, *, op=dist.ReduceOp.SUM, async_op: bool = False):
        self.logger.record("all_reduce", tensor)
        return dist.all_reduce(tensor, op=op, group=self.group, async_op=async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = False,
                       scratch_input: bool = False):
        """Sum `inp` (size * out.numel(), rank-major) over ranks; this rank's slice into `out`.
        `scratch_input`: the caller no longer needs `inp`, whose contents are then unspecified
        (the per-rank form reduces in place; without it, a copy is reduced)."""
        self.logger.record("reduce_scatter_tensor", inp)
        if self.size == 1:
            out.copy_(inp)
            return None
        if not self.per_rank:
            return _reduce_scatter_flat(out, inp, group=self.group, async_op=async_op)
        work = inp if scratch_input else inp.clone()
        n = out.numel()
        pieces = work.view(self.size, n)
        works = [dist.reduce(pieces[i], dst=dist.get_global_rank(self.group, i), group=self.group, async_op=True)
                 for i in range(self.size)]
        pending = Pending(works, then=lambda: out.copy_(pieces[self.rank]))
        return _settle(pending, async_op=async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = False):
        """Concatenate every rank's `inp` (equal sizes: shards are padded) into `out`, rank-major."""
        if self.per_rank or self.size == 1:
            rows = out.view(self.size, inp.numel())
            rows[self.rank].copy_(inp)
            return self.all_gather_rows(rows, async_op=async_op)
        self.logger.record("all_gather_into_tensor", out)
        return _all_gather_flat(out, inp, group=self.group, async_op=async_op)

    def all_gather_rows(self, rows: torch.Tensor, *, async_op: bool = False):
        """All-gather in place: this rank's row of a rank-major [size, n] tensor is its part;
        the other rows receive theirs. A whole parameter whose length is a multiple of the
        group size is gathered into its own storage this way. NCCL runs the flat collective
        (an in-place all-gather: the input is the output's own slice)."""
        self.logger.record("all_gather_into_tensor", rows)
        if self.size == 1:
            return None
        if not self.per_rank:
            return _all_gather_flat(rows.view(-1), rows[self.rank], group=self.group, async_op=async_op)
        works = [dist.broadcast(rows[i], src=dist.get_global_rank(self.group, i), group=self.group, async_op=True)
                 for i in range(self.size)]
        return _settle(Pending(works), async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0) -> None:
        self.logger.record("broadcast", tensor)
        if self.size > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src), group=self.group)

    def send(self, tensor: torch.Tensor, *, dst: int, tag: int):
        """Start sending `tensor` to group rank `dst`; the work to wait on (keep `tensor` alive until then)."""
        self.logger.record("send", tensor)
        return dist.isend(tensor, dst=dist.get_global_rank(self.group, dst), group=self.group, tag=tag)

    def recv(self, tensor: torch.Tensor, *, src: int, tag: int) -> torch.Tensor:
        """Receive into `tensor` from group rank `src` (blocking); returns it."""
        self.logger.record("recv", tensor)
        dist.recv(tensor, src=dist.get_global_rank(self.group, src), group=self.group, tag=tag)
        return tensor

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable `obj`, in group-rank order."""
        self.logger.record("all_gather_object", None)
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def any_true(self, flag: bool, *, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any (e.g. an fp16 overflow)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a one-element fp32 tensor over ranks (in place) and return it."""
        self.all_reduce(value)
        return value


def world_collectives(*, coll: Collectives, spans_world: bool) -> Collectives:
    """Collectives over every rank that steps together, for a flag all of them must agree on
    (fp16's overflow): `coll` itself when its group already spans the world (dp only), else the
    default group's, logged as "world.<op>", so one all-reduce replaces one per dimension."""
    if spans_world:
        return coll
    return Collectives(group=dist.group.WORLD, logger=PrefixedLogger(coll.logger, "world"))

