"""ZeRO stages 0-3 over one data-parallel group.

`build_zero` takes the model and the narrow slices it needs, keyword-only, shards the fp32
master weights, casts the model to the training dtype and returns the stage object the
Engine drives (see base.ZeroStage for the calls).
"""

from __future__ import annotations

import torch
from torch import nn

from zeroplan.schemas.plan import ZeroPlan

from ..comm import Collectives
from .base import ZeroStage, init_master, module_order_parameters, trainable_parameters
from .comm import BucketReducer
from .layout import ShardLayout
from .stage0 import Stage0
from .stage12 import Stage1, Stage2
from .stage3 import Stage3, is_persistent

__all__ = ["ZeroStage", "build_zero"]


def build_zero(*, model: nn.Module, zero: ZeroPlan, coll: Collectives, device: torch.device,
               param_dtype: torch.dtype, reduce_dtype: torch.dtype, predivide: float) -> ZeroStage:
    """Shard `model` for `zero.stage` over `coll`'s group; the model is cast to `param_dtype`."""
    stage = zero.stage
    named = module_order_parameters(model) if stage == 3 else trainable_parameters(model)
    if not named:
        raise ValueError("the model has no parameter with requires_grad=True; there is nothing to train")
    layout = ShardLayout(params=named, world=1 if stage == 0 else coll.size)
    master = init_master(layout, coll.rank if layout.world > 1 else 0, device)
    model.to(dtype=param_dtype)
    common = dict(model=model, layout=layout, coll=coll, master=master, param_dtype=param_dtype,
                  allgather_bucket_size=zero.allgather_bucket_size, overlap=zero.overlap_comm)
    if stage == 0:
        built = Stage0(grad=torch.zeros_like(master), **common)
    elif stage == 1:
        total = sum(s.numel for s in layout.slots)
        built = Stage1(grad=torch.zeros_like(master),
                       accumulation=torch.zeros(total, dtype=torch.float32, device=device), **common)
    elif stage == 2:
        built = Stage2(grad=torch.zeros_like(master), **common)
    else:
        built = _stage3(model=model, zero=zero, layout=layout, master=master, common=common)
    built.reducer = BucketReducer(layout=layout, coll=coll, bucket_size=zero.reduce_bucket_size,
                                  reduce_dtype=reduce_dtype, scatter=stage > 0, overlap=zero.overlap_comm,
                                  predivide=predivide, grad_shard=built.grad, accumulate=stage >= 2,
                                  source=built.source)
    built.attach()
    return built


def _stage3(*, model: nn.Module, zero: ZeroPlan, layout: ShardLayout, master: torch.Tensor,
            common: dict) -> Stage3:
    persistent = {s.index for s in layout.slots if is_persistent(s.numel, zero.param_persistence_threshold)}
    units: dict[nn.Module, list[int]] = {}
    for module in model.modules():
        own = [layout.index_of(p) for p in module.parameters(recurse=False)]
        own = [i for i in own if i is not None and i not in persistent]
        if own:
            units[module] = sorted(own)
    param_dtype = common["param_dtype"]
    pshard = master if param_dtype == torch.float32 else master.to(param_dtype)
    return Stage3(grad=torch.zeros_like(master), units=units, persistent=persistent, pshard=pshard,
                  prefetch_bucket_size=zero.prefetch_bucket_size, **common)
