"""Materialising a meta-device model's tensors the moment an initialiser touches them.

Replaying a model's initialisation (meta_replay.py) runs torch and Hugging Face init code that
writes `module.weight` and friends in place. Materialising every tensor first would hold the
whole model; instead `LazyTensors` is a TorchFunctionMode that sees every torch call of the
replay and makes a watched tensor real just before the first call that names it (metadata
reads such as `.shape` pass through; the set is released.METADATA, the one ZeRO-3 uses):

  fresh     never touched: its first touch allocates it on the CPU, NaN-filled when it is a
            float tensor, so an element no initialiser wrote is found afterwards;
  live      whole, written in place by the running init step;
  settled   (sharded tensors only) right after a call that wrote it whole (`WRITES`), and for
            the rest at the end of each init step, this rank's chunk is copied into the fp32
            shard (layout.py geometry) and the whole tensor dropped; a later touch all-gathers
            it back (a collective: every rank replays the same steps in the same order),
            unless that touch overwrites the whole tensor.

A tensor leaves the meta device by `torch.utils.swap_tensors`, which keeps its Python object:
tied weights, the user's references and the layout's parameter list stay valid; every later
access goes through this mode, so a view taken before a settle and written after it is the
one pattern it cannot follow (init code writes through the parameter). Init code that writes
each tensor with one `WRITES` call holds one parameter whole at a time; other code holds one
init step's (one module's init), so a ZeRO-3 rank's peak is its shard plus one module's
parameters at most, as with DeepSpeed's zero.Init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .comm import Collectives
from .zero.layout import ShardLayout, Slot
from .zero.released import METADATA

_init, _T = torch.nn.init, torch.Tensor
WRITES = frozenset({
    _init.normal_, _init.uniform_, _init.trunc_normal_, _init.constant_, _init.ones_, _init.zeros_, _init.eye_,
    _init.xavier_uniform_, _init.xavier_normal_, _init.kaiming_uniform_, _init.kaiming_normal_, _init.orthogonal_,
    _T.normal_, _T.uniform_, _T.fill_, _T.zero_, _T.copy_,
})
"""Calls that write every element of their first tensor argument and read none: a settled
tensor they touch first needs no all-gather of its old values."""


@dataclass
class Watched:
    """One tensor of the model that started on the meta device."""

    name: str
    tensor: torch.Tensor
    slot: Slot | None
    """Its place in the ZeRO-3 shard; None outside it (stages 0-2, frozen parameters, buffers)."""
    whole: bool
    """Whether it stays whole after the replay (everything but the partitioned parameters)."""
    state: str = "fresh"
    incomplete: bool = False
    """Whether the last settle (or the end) found elements no initialiser wrote (NaN)."""


class LazyTensors(TorchFunctionMode):
    """Watches `tensors` (name -> meta tensor); `layout`, `rank`, `coll` and `shard` shard the
    ones with a slot in `layout` (pass layout None to keep every tensor whole)."""

    def __init__(self, *, tensors: dict[str, torch.Tensor], layout: ShardLayout | None, rank: int,
                 coll: Collectives, device: torch.device, whole: set[int]):
        super().__init__()
        self.layout, self.rank, self.coll, self.device = layout, rank, coll, device
        self.shard = torch.zeros(layout.numel if layout is not None else 0, dtype=torch.float32)
        """This rank's fp32 shard of the sharded tensors' initial values (padding zero)."""
        self.watched: dict[int, Watched] = {}
        for name, t in tensors.items():
            index = layout.index_of(t) if layout is not None else None
            slot = layout.slots[index] if index is not None else None
            self.watched.setdefault(id(t), Watched(name=name, tensor=t, slot=slot,
                                                   whole=slot is None or index in whole))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA:
            return func(*args, **kwargs)
        target = kwargs.get("tensor", args[0] if args else None)
        for leaf in tree_leaves((args, kwargs)):
            entry = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if entry is not None and entry.state != "live":
                self._materialize(entry, overwritten=leaf is target and func in WRITES)
        out = func(*args, **kwargs)
        written = self.watched.get(id(target)) if func in WRITES and isinstance(target, torch.Tensor) else None
        if written is not None and not written.whole:
            self._settle(written)  # written whole: keep only the chunk now, not at the end of the step
        return out

    def _materialize(self, entry: Watched, *, overwritten: bool) -> None:
        t = entry.tensor
        if entry.state == "settled" and not overwritten:
            values = self._gather(entry.slot).view(t.shape).to(t.dtype)
        elif t.is_floating_point():
            values = torch.full(t.shape, float("nan"), dtype=t.dtype)
        else:
            values = torch.empty(t.shape, dtype=t.dtype)
        if t.is_meta:
            new = nn.Parameter(values, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else values
            attributes = dict(t.__dict__)
            torch.utils.swap_tensors(t, new)
            t.__dict__.update(attributes)
        else:
            t.data = values
        entry.state = "live"

    def _gather(self, slot: Slot) -> torch.Tensor:
        """The whole flat tensor of `slot` from every rank's settled chunk (through the group's
        device: NCCL takes no CPU tensor)."""
        out = torch.empty(self.layout.world * slot.chunk, dtype=torch.float32, device=self.device)
        self.coll.all_gather(out, self.shard[slot.offset:slot.offset + slot.chunk].to(self.device))
        return out[:slot.numel].cpu()

    def settle(self, *, final: bool = False) -> None:
        """End of an init step: keep only this rank's chunk of every live partitioned tensor.
        `final` (end of the replay): also copy the chunks of the ones that stay whole, and
        check every live tensor for elements nobody wrote."""
        for entry in self.watched.values():
            if entry.state == "live" and (final or not entry.whole):
                self._settle(entry)

    def _settle(self, entry: Watched) -> None:
        t = entry.tensor
        if t.is_floating_point():
            entry.incomplete = bool(t.detach().isnan().any())
        if entry.slot is None:
            return
        slot = entry.slot
        self.shard[slot.offset:slot.offset + slot.chunk] = self.layout.chunk_of(t.detach().reshape(-1).float(),
                                                                               slot, self.rank)
        if not entry.whole:
            t.data = torch.full((1,), float("nan"), dtype=t.dtype).expand(slot.shape)
            entry.state = "settled"

    def unwritten(self) -> list[Watched]:
        """After the replay: tensors some element of which no init step wrote (never touched,
        or NaN left), once the last chunks are settled."""
        self.settle(final=True)
        return [entry for entry in self.watched.values() if entry.state == "fresh" or entry.incomplete]
