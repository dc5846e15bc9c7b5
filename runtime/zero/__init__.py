"""ZeRO stages 0-3 over one data-parallel group.

`build_zero` takes the model and the narrow slices it needs, keyword-only, shards the fp32
master weights, casts the model to the training dtype and returns the stage object the
Engine drives (see base.ZeroStage for the calls).

Where the master and the stage-3 partition live is the caller's choice, through two factories
(runtime/offload passes its own): `place_master(layout, rank)` takes this rank's initial fp32
shard and returns the device master, or None when it keeps the master elsewhere;
`param_store(layout, rank, dtype, master)` returns the stage-3 partition's store, or None for
the default: a tensor on the device.

A model built on the meta device has no values to shard: at stage 3 `materialize(layout=,
rank=, whole=, param_dtype=)` (runtime/meta_init.materialize_shard) makes this rank's fp32
shard of its initial values, which the factories then read through the layout.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from zeroplan.compiler.shapes import persistent_tensors
from zeroplan.compiler.shards import gradient_stage, reduces_in_place
from zeroplan.schemas.plan import ZeroPlan

from ..comm import Collectives
from .base import ZeroStage, init_master, module_order_parameters, trainable_parameters
from .comm import BucketReducer
from .layout import ShardLayout
from .param_store import DeviceParams, ParamStore
from .stage0 import Stage0
from .stage12 import Stage1, Stage1Direct, Stage2
from .stage3 import Stage3

__all__ = ["ParamStore", "ZeroStage", "build_zero", "shard_numel"]

PlaceMaster = Callable[[ShardLayout, int], "torch.Tensor | None"]
MakeParamStore = Callable[[ShardLayout, int, torch.dtype, "torch.Tensor | None"], "ParamStore | None"]
Materialize = Callable[..., torch.Tensor]


def shard_numel(model: nn.Module, *, stage: int, world: int) -> int:
    """Elements of one rank's shard (padded), before anything is built: for pre-flight checks."""
    w = 1 if stage == 0 else world
    return sum(-(-p.numel() // w) for _, p in trainable_parameters(model))


def build_zero(*, model: nn.Module, zero: ZeroPlan, coll: Collectives, device: torch.device,
               param_dtype: torch.dtype, reduce_dtype: torch.dtype, predivide: float, accumulation: int,
               place_master: PlaceMaster | None = None, param_store: MakeParamStore | None = None,
               materialize: Materialize | None = None) -> ZeroStage:
    """Shard `model` for `zero.stage` over `coll`'s group; the model is cast to `param_dtype`.
    `accumulation`: micro-batches per optimizer step (stage 1 keeps a whole gradient buffer only
    when there is more than one).
    `materialize` (stage 3 only): the model's parameters are on the meta device (module docstring)."""
    stage = zero.stage
    named = module_order_parameters(model) if stage == 3 else trainable_parameters(model)
    if not named:
        raise ValueError("the model has no parameter with requires_grad=True; there is nothing to train")
    layout = ShardLayout(params=named, world=1 if stage == 0 else coll.size)
    rank = coll.rank if layout.world > 1 else 0
    persistent = _persistent(layout, zero) if stage == 3 else set()
    if materialize is not None and stage != 3:
        raise ValueError(f"materialize is for stage 3, where each rank keeps a shard; stage {stage} takes the "
                         "model whole (meta_init.materialize_whole)")
    if materialize is not None:
        layout.initial = (rank, materialize(layout=layout, rank=rank, whole=persistent, param_dtype=param_dtype))
    try:
        return _build(model=model, zero=zero, layout=layout, rank=rank, persistent=persistent, coll=coll,
                      device=device, param_dtype=param_dtype, reduce_dtype=reduce_dtype, predivide=predivide,
                      accumulation=accumulation, place_master=place_master, param_store=param_store)
    finally:
        layout.initial = None


def _build(*, model: nn.Module, zero: ZeroPlan, layout: ShardLayout, rank: int, persistent: set[int],
           coll: Collectives, device: torch.device, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
           predivide: float, accumulation: int, place_master: PlaceMaster | None,
           param_store: MakeParamStore | None) -> ZeroStage:
    stage = zero.stage
    if place_master is None:
        master = init_master(layout, rank, device)
    else:
        master = place_master(layout, rank)
    model.to(dtype=param_dtype)
    common = dict(model=model, layout=layout, coll=coll, master=master, param_dtype=param_dtype,
                  allgather_bucket_size=zero.allgather_bucket_size, overlap=zero.overlap_comm)
    grad = torch.zeros(layout.numel, dtype=torch.float32, device=device)
    if stage == 0:
        built = Stage0(grad=grad, **common)
    elif gradient_stage(stage=stage, accumulation=accumulation) == 1:
        total = sum(s.numel for s in layout.slots)
        built = Stage1(grad=grad, accumulation=torch.zeros(total, dtype=torch.float32, device=device), **common)
    elif stage in (1, 2):
        built = (Stage1Direct if stage == 1 else Stage2)(grad=grad, **common)
    else:
        store = _partition(layout=layout, rank=rank, master=master, param_dtype=param_dtype,
                           param_store=param_store)
        built = _stage3(model=model, zero=zero, layout=layout, persistent=persistent, grad=grad, param_store=store,
                        common=common)
    built.reducer = BucketReducer(layout=layout, coll=coll, bucket_size=zero.reduce_bucket_size,
                                  reduce_dtype=reduce_dtype, scatter=stage == 3 or (stage > 0 and zero.reduce_scatter),
                                  overlap=zero.overlap_comm,
                                  predivide=predivide, grad_shard=built.grad,
                                  accumulate=isinstance(built, (Stage2, Stage3)),
                                  source=built.source,
                                  in_place=reduces_in_place(stage=stage, reduce_bytes=reduce_dtype.itemsize))
    built.attach()
    return built


def _partition(*, layout: ShardLayout, rank: int, master: torch.Tensor | None, param_dtype: torch.dtype,
               param_store: MakeParamStore | None) -> ParamStore:
    """The stage-3 partition: the caller's store, or a device tensor (the fp32 master itself
    when training in fp32), cut from the parameters already cast to `param_dtype`."""
    store = param_store(layout, rank, param_dtype, master) if param_store is not None else None
    if store is not None:
        return store
    if master is not None and param_dtype == torch.float32:
        return DeviceParams(master)
    return DeviceParams(layout.read_params(0, layout.numel, rank, dtype=param_dtype))


def _persistent(layout: ShardLayout, zero: ZeroPlan) -> set[int]:
    """Stage 3's slots that stay whole on every rank (compiler.shapes.persistent_tensors)."""
    flags = persistent_tensors([s.numel for s in layout.slots], threshold=zero.param_persistence_threshold,
                               cap=zero.model_persistence_threshold)
    return {s.index for s, keep in zip(layout.slots, flags) if keep}


def _stage3(*, model: nn.Module, zero: ZeroPlan, layout: ShardLayout, persistent: set[int], grad: torch.Tensor,
            param_store: ParamStore, common: dict) -> Stage3:
    units: dict[nn.Module, list[int]] = {}
    for module in model.modules():
        own = [layout.index_of(p) for p in module.parameters(recurse=False)]
        own = [i for i in own if i is not None and i not in persistent]
        if own:
            units[module] = sorted(own)
    return Stage3(grad=grad, units=units, persistent=persistent, param_store=param_store,
                  prefetch_bucket_size=zero.prefetch_bucket_size, max_live_parameters=zero.max_live_parameters,
                  max_reuse_distance=zero.max_reuse_distance, **common)
