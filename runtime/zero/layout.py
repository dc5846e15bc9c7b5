"""Where every trainable parameter lives in a rank's flat shard.

Each parameter is flattened, padded to a multiple of the shard world W and cut into W equal
chunks; rank r owns chunk r of every parameter, and its shard is those chunks concatenated in
parameter order. The padding (< W elements per parameter) is what lets gloo, whose
all-gather needs equal sizes, gather any run of consecutive parameters in one call, and lets
any run be reduce-scattered with one `reduce_scatter_tensor`: a run's buffer is laid out
rank-major, [W, sum of chunks], so rank r's part is exactly its contiguous shard slice.

With W = 1 (ZeRO stage 0) the shard is the whole flat parameter vector, unpadded.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from zeroplan.compiler.shards import chunk as chunk_of_tensor, pack_buckets


@dataclass(frozen=True)
class Slot:
    """One parameter in the layout."""

    index: int
    name: str
    shape: torch.Size
    numel: int
    chunk: int
    """Elements of this parameter per rank (ceil(numel / W))."""
    offset: int
    """Where this rank's chunk starts in the shard."""


class ShardLayout:
    """Slots of `params` (name, parameter) for shard world `world`; the order is given."""

    def __init__(self, *, params: list[tuple[str, nn.Parameter]], world: int):
        self.world = world
        self.params = [p for _, p in params]
        slots, offset = [], 0
        for i, (name, p) in enumerate(params):
            chunk = chunk_of_tensor(p.numel(), world)
            slots.append(Slot(index=i, name=name, shape=p.shape, numel=p.numel(), chunk=chunk, offset=offset))
            offset += chunk
        self.slots: list[Slot] = slots
        self.numel = offset
        """Elements per rank's shard."""
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._offsets = [s.offset for s in slots]
        self.initial: tuple[int, torch.Tensor] | None = None
        """(rank, that rank's fp32 shard of the initial values) while a model built on the meta
        device is being sharded (runtime/meta_init.py): its parameters hold no values yet, so
        `read_params` of that rank reads here, an fp32 read sharing the shard's storage (build_zero's
        factories read it once, for the master or the partition, and the shard is dropped after).
        None otherwise."""

    def __len__(self) -> int:
        return len(self.slots)

    def index_of(self, param: nn.Parameter) -> int | None:
        return self._index.get(id(param))

    def span(self, start: int, end: int) -> tuple[int, int]:
        """(offset, length) in the shard of slots [start, end)."""
        first, last = self.slots[start], self.slots[end - 1]
        return first.offset, last.offset + last.chunk - first.offset

    def runs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Maximal runs [start, end) of consecutive slot indices, for one collective each."""
        out: list[tuple[int, int]] = []
        for i in sorted(set(indices)):
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
        return out

    def pieces(self, lo: int, hi: int, rank: int) -> Iterator[tuple[int, int, int, int]]:
        """The real (unpadded) elements of shard range [lo, hi) of rank `rank`, per parameter:
        (slot index, position in the range, start in the flat parameter, length)."""
        first = max(bisect_right(self._offsets, lo) - 1, 0)
        for slot in self.slots[first:]:
            if slot.offset >= hi:
                return
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.chunk)
            start = rank * slot.chunk + a - slot.offset
            length = min(b - a, slot.numel - start)
            if length > 0:
                yield slot.index, a - lo, start, length

    def read_params(self, lo: int, hi: int, rank: int, *, dtype: torch.dtype) -> torch.Tensor:
        """Shard range [lo, hi) of rank `rank` cut from the whole parameters (padding is zero)."""
        if self.initial is not None:
            owner, shard = self.initial
            if rank != owner:
                raise ValueError(f"rank {owner} holds the initial values of its own shard only, not rank {rank}'s")
            return shard[lo:hi].to(dtype=dtype)  # fp32 shares the storage: the master takes it over
        device = self.params[0].device if self.params else None
        out = torch.zeros(hi - lo, dtype=dtype, device=device)
        for index, at, start, length in self.pieces(lo, hi, rank):
            out[at:at + length] = self.params[index].detach().reshape(-1)[start:start + length]
        return out

    def write_params(self, lo: int, values: torch.Tensor, rank: int) -> None:
        """Write shard range [lo, lo + len(values)) of rank `rank` into its chunks of the whole
        parameters (cast to their dtype): the inverse of `read_params`."""
        for index, at, start, length in self.pieces(lo, lo + values.numel(), rank):
            self.params[index].data.view(-1)[start:start + length].copy_(values[at:at + length])

    def chunk_of(self, flat_full: torch.Tensor, slot: Slot, rank: int) -> torch.Tensor:
        """Rank `rank`'s chunk of a full flat parameter (zero-padded at the end)."""
        lo = rank * slot.chunk
        hi = min(lo + slot.chunk, slot.numel)
        out = flat_full.new_zeros(slot.chunk)
        if hi > lo:
            out[: hi - lo] = flat_full[lo:hi]
        return out

    def buckets(self, max_elements: int, *, reverse: bool) -> list[tuple[int, int]]:
        """Consecutive slot ranges of at most `max_elements` padded elements (one slot at least),
        from the last parameter when `reverse`: compiler.shards.pack_buckets, which the comm
        model uses too."""
        return pack_buckets([s.numel for s in self.slots], world=self.world, max_elements=max_elements,
                            reverse=reverse)
