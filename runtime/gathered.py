"""Whole parameters outside the forward, at every ZeRO stage: DeepSpeed's `GatheredParameters`
and `register_external_parameter`.

    with zeroplan.gathered(model.lm_head.weight):                 # on every rank
        penalty = model.lm_head.weight.square().sum()
    with zeroplan.gathered(model.emb.weight, modifier_rank=0):    # on every rank
        if rank == 0:
            model.emb.weight[0].zero_()                           # every rank's shard gets it
    zeroplan.register_external_parameter(model, model.emb.weight) # model's forward reads it

`gathered(params, modifier_rank=None)`, a collective over each engine's dp group:
  1. enter: ZeRO-3 gathers the parameters and holds them (stages 0-2 keep them whole), with its
     saved-tensor hooks on, so autograd keeps the parameter rather than its gathered storage and
     the backward gathers it again;
  2. exit with `modifier_rank` r: each parameter is broadcast from dp rank r, and every rank
     writes its chunk into its fp32 master through the optimizer, which hands the range to the
     stage's parameter copy (the ZeRO-3 partition; stages 0-2's whole parameters). Only elements
     whose value in the parameters' dtype changed are written, so a bf16 run keeps the fp32 bits
     of the rest;
  3. exit: ZeRO-3 releases them, unless a running forward or another block still holds them.
An exception inside the block skips 2 (a collective that other ranks would not enter). Without
`modifier_rank` writes stay on the rank that made them and the next gather or step overwrites them.

`register_external_parameter(module, param)`: `module`'s forward gathers `param` too. ZeRO-3 does
this by itself for a parameter a module reads without owning it (stage3.py); registering ahead
saves the first forward's on-demand gather. Called before `initialize`, the registration is
kept on the module and applied when the engine is built.

Frozen parameters are whole on every rank: `gathered` only broadcasts them for `modifier_rank`.
Parameters no engine trains are left alone.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from zeroplan.schemas import ConfigError, Problem

from .zero.stage3 import EXTERNAL

if TYPE_CHECKING:
    from .engine import Engine

_ENGINES: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Parameter -> a weak reference to the engine that trains it (the engine holds the parameter:
a strong reference would keep the entry, and the engine, alive for ever)."""


def attach_engine(engine: Engine) -> None:
    """Make `engine`'s parameters known to `gathered` and `register_external_parameter`."""
    ref = weakref.ref(engine)
    for p in engine.module.parameters():
        _ENGINES[p] = ref


def _engine_of(param: torch.Tensor) -> Engine | None:
    ref = _ENGINES.get(param)
    return None if ref is None else ref()


@contextlib.contextmanager
def gathered(params: torch.Tensor | Iterable[torch.Tensor], *, modifier_rank: int | None = None) -> Iterator[None]:
    """Hold `params` whole on every rank for the block (see the module docstring); enter it on
    every rank of the dp group. `modifier_rank`: the dp rank whose writes every rank keeps."""
    groups = _by_engine(params)
    for engine in groups:
        _check_rank(modifier_rank, engine)
    with contextlib.ExitStack() as stack:
        for engine, items in groups.items():
            zero = engine.zero
            indices = [i for i in (zero.layout.index_of(p) for p in items) if i is not None]
            zero.hold(indices)
            stack.callback(zero.unhold, indices)
            stack.enter_context(zero.saved_tensors_hooks())
        yield
        if modifier_rank is not None:
            for engine, items in groups.items():
                _adopt(engine, items, src=modifier_rank)


def register_external_parameter(module: nn.Module, param: torch.Tensor) -> None:
    """`module`'s forward gathers `param` as well as its own parameters (ZeRO-3; no effect at
    stages 0-2, where parameters are whole)."""
    if not isinstance(module, nn.Module) or not isinstance(param, torch.Tensor):
        raise TypeError(f"register_external_parameter(module, param) takes an nn.Module and a parameter, got "
                        f"{type(module).__name__} and {type(param).__name__}")
    engine = _engine_of(param)
    if engine is None:  # not trained yet: the stage reads it when it is built
        pending = module.__dict__.setdefault(EXTERNAL, [])
        if not any(p is param for p in pending):
            pending.append(param)
        return
    engine.zero.register_external(module, param)


def _by_engine(params) -> dict[Engine, list[torch.Tensor]]:
    """The parameters grouped by the engine training them, each once, in the order given."""
    if isinstance(params, torch.Tensor):
        params = [params]
    groups: dict[Engine, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for p in params:
        engine = _engine_of(p)
        if engine is not None and id(p) not in seen:
            seen.add(id(p))
            groups.setdefault(engine, []).append(p)
    return groups


def _check_rank(modifier_rank: int | None, engine: Engine) -> None:
    size = engine.groups.dp_size
    if modifier_rank is not None and not (isinstance(modifier_rank, int) and 0 <= modifier_rank < size):
        raise ConfigError(Problem("modifier_rank", f"must be a rank of the data-parallel group, 0 to {size - 1}",
                                  given=modifier_rank, suggestion="pass the dp rank whose writes to keep, or None"))


def _adopt(engine: Engine, params: list[torch.Tensor], *, src: int) -> None:
    """Every rank takes dp rank `src`'s values of `params` into its parameters and its shard."""
    zero = engine.zero
    layout = zero.layout
    with torch.no_grad():
        for p in params:
            engine.coll.broadcast(p.data, src=src)
            index = layout.index_of(p)
            if index is None:  # frozen: whole on every rank, outside the shards
                continue
            slot = layout.slots[index]
            if p.shape != slot.shape:
                raise ValueError(f"{slot.name} changed shape inside gathered(): {tuple(slot.shape)} -> "
                                 f"{tuple(p.shape)}; a trained parameter keeps its shape")
            chunk = layout.chunk_of(p.data.reshape(-1), slot, zero.rank)
            old = engine.optimizer.read_master(slot.offset, slot.chunk)
            new = torch.where(chunk != old.to(chunk.dtype), chunk.to(old.dtype), old)
            engine.optimizer.write_master(slot.offset, new)


__all__ = ["attach_engine", "gathered", "register_external_parameter"]
