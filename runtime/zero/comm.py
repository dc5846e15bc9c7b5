"""The collectives of ZeRO: bucketed gradient reduction and parameter gathering.

Buffers of a run of slots are rank-major, [W, sum of chunks] (see layout.py), so
- reduce-scatter of a gradient bucket hands each rank its contiguous shard slice, and
- all-gather of a shard slice returns every rank's chunks of the run, to be cut back into
  whole parameters.

`BucketReducer` phases (ZeRO paper, arXiv:1910.02054, section 5; PyTorch DDP's in-order
bucket launch, arXiv:2006.15704, section 4.2):
  1. a parameter's post-accumulate-grad hook marks it ready; buckets are launched strictly in
     their fixed order, each as soon as it and every earlier bucket are ready, so all ranks
     issue the same collectives in the same order even when some parameters got no gradient;
  2. `flush` (end of backward) launches the buckets still waiting, with zeros for parameters
     that got no gradient on this rank;
  3. `wait` (end of backward) waits for the collectives still in flight and adds each result,
     averaged over ranks, into the fp32 gradient shard.

Every collective is launched asynchronously. With `overlap_comm` each bucket has a buffer of its
own and every bucket may be in flight at once; without it one bucket is in flight: its
collective runs while backward fills the next bucket, whose launch first waits for it and then
reuses its buffer, so the memory is one bucket's, as a synchronous reduction's, and ranks that
reach a bucket at different times do not wait for each other at every bucket.

Every buffer is a pass over memory, and on the CPU a fresh one of 1 MiB or more also costs a
page fault per page (runtime/host_memory.py), so: at stage 0 the gradient buffer is the bucket
(`in_place`: all-reduced where backward accumulated it, no copy); elsewhere without
`overlap_comm` the buckets of one backward share one scratch buffer, as the parameter groups
of one `publish` share one gather buffer.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..comm import Collectives
from .layout import ShardLayout


def write_rows(region: torch.Tensor, flat: torch.Tensor | None) -> None:
    """Write a flat tensor into a [W, chunk] strided region row-major; zero the padding."""
    if flat is None:
        region.zero_()
        return
    world, chunk = region.shape
    n = flat.numel()
    full = n // chunk
    if full:
        region[:full].copy_(flat[: full * chunk].view(full, chunk))
    rest = n - full * chunk
    if full < world:
        if rest:
            region[full, :rest].copy_(flat[full * chunk:])
        region[full, rest:].zero_()
        region[full + 1:].zero_()


def read_rows(region: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `write_rows`: the first `numel` elements of a [W, chunk] region, row-major."""
    return region.reshape(-1)[:numel]


class BucketReducer:
    """Reduces gradients of a layout's slots over the dp group in fixed-order buckets.

    `source(i)` returns slot i's local gradient (any dtype, None if it got none) and is called
    when the bucket is launched (never when `in_place`); `scatter` chooses reduce-scatter
    (stages 1-3: the result is the shard slice) or all-reduce (stage 0, W = 1 layout: the result is the whole bucket; stages
    1-2 with `reduce_scatter` false, DeepSpeed's all-reduce: the result is every rank's slice
    and this rank keeps its own row);
    `accumulate` adds results into the gradient shard (stages 2-3 reduce every micro-batch)
    instead of assigning them (stages 0-1 reduce once, at the accumulation boundary).
    `in_place`: every source is already `grad_shard`'s own range of its slot (stage 0, W = 1),
    so each bucket is all-reduced and averaged right there, without a copy. A bucket in flight
    then holds no buffer, so every bucket may be in flight at once, whatever `overlap` says:
    what overlap_comm trades (buffers in flight for hidden communication, DDP's all-reduce
    during backward, arXiv:2006.15704 section 3.2.3) costs nothing here.
    """

    def __init__(self, *, layout: ShardLayout, coll: Collectives, bucket_size: int, reduce_dtype: torch.dtype,
                 scatter: bool, overlap: bool, predivide: float, grad_shard: torch.Tensor, accumulate: bool,
                 source: Callable[[int], torch.Tensor | None], in_place: bool = False):
        if in_place and (scatter or accumulate or layout.world != 1 or reduce_dtype != grad_shard.dtype):
            raise ValueError("in_place reduction needs an all-reduce (scatter false) that assigns (accumulate "
                             f"false) over a W = 1 layout in the gradient's dtype; got scatter={scatter}, "
                             f"accumulate={accumulate}, W={layout.world}, reduce {reduce_dtype} into "
                             f"{grad_shard.dtype}")
        self.layout, self.coll, self.scatter, self.overlap = layout, coll, scatter, overlap
        self.accumulate, self.in_place = accumulate, in_place
        self.reduce_dtype, self.predivide = reduce_dtype, predivide
        self.grad_shard, self.source = grad_shard, source
        self.buckets = layout.buckets(bucket_size, reverse=True)
        self._bucket_of = {i: b for b, (s, e) in enumerate(self.buckets) for i in range(s, e)}
        self._pending: list[tuple[object, torch.Tensor | None, torch.Tensor, int, int]] = []
        self._scratch: torch.Tensor | None = None
        """Without overlap: the buffer the buckets of this backward share in turn (dropped by `wait`)."""
        self.reset()

    def reset(self) -> None:
        self._missing = [e - s for s, e in self.buckets]
        self._seen: set[int] = set()
        self._next = 0

    def mark_ready(self, index: int) -> None:
        if index in self._seen:
            return
        self._seen.add(index)
        self._missing[self._bucket_of[index]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)
            self._next += 1

    def flush(self) -> None:
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        start, end = self.buckets[b]
        offset, length = self.layout.span(start, end)
        if self.in_place:
            buf, out = None, self.grad_shard[offset:offset + length]
            if self.predivide != 1.0:
                out.div_(self.predivide)
            work = self.coll.all_reduce(out, async_op=True)
        else:
            if not self.overlap:
                self._finish()  # one bucket in flight: the previous one's buffer becomes this one's
            buf, out, work = self._copy_and_reduce(start, end, offset, length)
        self._pending.append((work, buf, out, offset, length))  # buf stays alive until waited

    def _copy_and_reduce(self, start: int, end: int, offset: int, length: int):
        world = self.layout.world
        whole = self._buffer(world * length + (length if self.scatter else 0))
        buf = whole[:world * length].view(world, length)
        for slot in self.layout.slots[start:end]:
            o = slot.offset - offset
            write_rows(buf[:, o:o + slot.chunk], self._flat(slot.index))
        if self.predivide != 1.0:
            buf.div_(self.predivide)
        if self.scatter:
            out = whole[world * length:]
            work = self.coll.reduce_scatter(out, buf.view(-1), async_op=True, scratch_input=True)
        else:
            out = buf.view(-1)
            work = self.coll.all_reduce(out, async_op=True)
        return whole, out, work

    def _buffer(self, numel: int) -> torch.Tensor:
        """A bucket's buffer: fresh with overlap (several in flight), else this backward's scratch,
        replaced by a larger one when a bucket needs more."""
        if self.overlap:
            return torch.empty(numel, dtype=self.reduce_dtype, device=self.grad_shard.device)
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = None
            self._scratch = torch.empty(numel, dtype=self.reduce_dtype, device=self.grad_shard.device)
        return self._scratch[:numel]

    def _flat(self, index: int) -> torch.Tensor | None:
        grad = self.source(index)
        return None if grad is None else grad.reshape(-1)

    def wait(self) -> None:
        """Wait for launched collectives; add their averaged results into the gradient shard.
        Ends the backward's reduction: the shared scratch buffer is released."""
        self._finish()
        self._scratch = None

    def _finish(self) -> None:
        scale = self.predivide / self.coll.size
        for work, _buf, out, offset, length in self._pending:
            if work is not None:
                work.wait()
            if not self.scatter and self.layout.world > 1:
                out = out.view(self.layout.world, length)[self.coll.rank]
            target = self.grad_shard[offset:offset + length]
            if self.accumulate:
                target.add_(out.to(target.dtype), alpha=scale)
            elif out.data_ptr() == target.data_ptr():  # reduced in place
                target.mul_(scale)
            else:
                torch.mul(out.to(target.dtype), scale, out=target)
        self._pending.clear()


class GatherHandle:
    """An all-gather of slots [start, end) in flight; `finish` writes whole parameters."""

    def __init__(self, *, layout: ShardLayout, start: int, end: int, part: torch.Tensor, out: torch.Tensor, work):
        self.layout, self.start, self.end, self.out, self.work = layout, start, end, out, work
        self.part = part
        """The sent shard range, kept alive until the collective is waited."""

    def finish(self, write: Callable[[int, torch.Tensor], None]) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        self.part = None
        offset, length = self.layout.span(self.start, self.end)
        rows = self.out.view(self.layout.world, length)
        for slot in self.layout.slots[self.start:self.end]:
            o = slot.offset - offset
            write(slot.index, read_rows(rows[:, o:o + slot.chunk], slot.numel).view(slot.shape))


def gather_slots(*, layout: ShardLayout, coll: Collectives, part: torch.Tensor, start: int, end: int,
                 async_op: bool, scratch: torch.Tensor | None = None) -> GatherHandle:
    """Launch the all-gather of slots [start, end); `part` is this rank's shard range for them
    (`layout.span(start, end)`), in the dtype and on the device the collective runs in.
    `scratch`: a buffer of at least W x `part` elements to gather into (free until `finish`),
    else a fresh one."""
    numel = layout.world * part.numel()
    if scratch is None:
        out = torch.empty(numel, dtype=part.dtype, device=part.device)
    else:
        out = scratch[:numel]
    work = coll.all_gather(out, part, async_op=async_op)
    return GatherHandle(layout=layout, start=start, end=end, part=part, out=out, work=work)


def gather_groups(layout: ShardLayout, max_elements: int) -> list[tuple[int, int]]:
    """Consecutive slot ranges of at most `max_elements` gathered elements, in order."""
    return layout.buckets(max_elements, reverse=False)
