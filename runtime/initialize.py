"""`initialize(model, plan=...)`: build the Engine for a model from a Plan.

Each part gets only its slice of the plan, keyword-only: the process groups from
`plan.world`/`plan.parallel`, the ZeRO stage from `plan.zero`, the optimizer from
`plan.optimizer`/`plan.kernels`, the schedule from `plan.scheduler`, the loss scaler from
`plan.precision`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Plan, Problem

from .comm import Collectives, CommsLogger
from .dist import init_distributed
from .engine import Engine
from .from_config import plan_from_config
from .optim import build_optimizer
from .parallel.pipeline_engine import PipelineEngine, build_stage
from .precision import DTYPES, build_loss_scaler
from .schedulers import build_schedule
from .zero import build_zero

PLAN_ENV = "ZEROPLAN_PLAN"
"""Environment variable `zeroplan train PLAN -- script.py` sets to the plan's path."""


def resolve_plan(plan: Plan | str | Path | None) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if plan is None:
        path = os.environ.get(PLAN_ENV)
        if not path:
            raise ConfigError(Problem("plan", "no plan given and $ZEROPLAN_PLAN is not set",
                                      suggestion="pass plan=PATH, or launch with `zeroplan train PLAN -- script.py`"))
        plan = path
    return Plan.load(plan)


def initialize(model: nn.Module, *, plan: Plan | str | Path | None = None,
               config: str | Path | Mapping[str, Any] | None = None,
               model_spec: ModelSpec | str | Path | None = None,
               cluster: ClusterSpec | str | Path | None = None) -> Engine:
    """Shard `model` as `plan` says and return the Engine that trains it.

    `config=` (a config file or dict whose fields are all concrete) is compiled into the plan
    here; see from_config.py for `model_spec=` and `cluster=`. Initialises torch.distributed
    from the torchrun environment when it is not yet (gloo on CPU, NCCL on CUDA; one process
    needs no launcher). Every rank's parameters and buffers are made equal to rank 0's first.
    """
    if config is not None:
        if plan is not None:
            raise ConfigError(Problem("config", "give plan= or config=, not both"))
        plan = plan_from_config(config, model=model, model_spec=model_spec, cluster=cluster)
    plan = resolve_plan(plan)
    if plan.offload.optimizer.device != "none" or plan.offload.param.device != "none":
        raise ConfigError(Problem("offload", "this runtime does not offload yet",
                                  suggestion="compile the plan with offload_optimizer/offload_param device none"))
    if plan.parallel.tp != 1:
        raise ConfigError(Problem("parallel.tp", f"this runtime does not run tensor parallelism yet, but the plan "
                                  f"has tp({plan.parallel.tp})", suggestion="compile the plan with tp = 1"))
    _check_pipeline(plan)
    groups = init_distributed(world=plan.world, parallel=plan.parallel)
    coll = Collectives(group=groups.dp_group, logger=CommsLogger())
    model.to(groups.device)
    with torch.no_grad():  # over the world: with pp > 1 every rank still holds the whole model here
        for t in list(model.parameters()) + list(model.buffers()):
            if groups.world_size > 1:
                torch.distributed.broadcast(t.data, src=0)
    stage = None
    if plan.parallel.pp > 1:
        stage = build_stage(model, groups=groups, method=plan.parallel.pipeline_partition_method)
        model = stage.module
    precision = plan.precision
    param_dtype = DTYPES[precision.param_dtype]
    zero = build_zero(model=model, zero=plan.zero, coll=coll, device=groups.device, param_dtype=param_dtype,
                      reduce_dtype=DTYPES[precision.reduce_dtype],
                      predivide=plan.optimizer.gradient_predivide_factor)
    optimizer = build_optimizer(optimizer=plan.optimizer, kernels=plan.kernels, numel=zero.layout.numel,
                                device=groups.device)
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=plan.optimizer)
    scaler = build_loss_scaler(loss_scaling=precision.loss_scaling, param_dtype=precision.param_dtype)
    coll.logger.reset()
    parts = dict(model=model, plan=plan, groups=groups, coll=coll, zero=zero, optimizer=optimizer,
                 schedule=schedule, scaler=scaler, param_dtype=param_dtype)
    return Engine(**parts) if stage is None else PipelineEngine(stage=stage, **parts)


def _check_pipeline(plan: Plan) -> None:
    """pp > 1 runs ZeRO stages 0-2 (the compiler refuses stage 3 with pp; a hand-made plan is refused here)."""
    if plan.parallel.pp > 1 and plan.zero.stage == 3:
        raise ConfigError(Problem("zero.stage", f"ZeRO stage 3 with pp({plan.parallel.pp}) > 1 is not supported: "
                                  "stage 3 gathers parameters per module while pipeline stages own disjoint modules",
                                  suggestion="compile the plan with zero_optimization.stage 0, 1 or 2, or parallel.pp 1"))
