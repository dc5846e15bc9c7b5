"""`initialize(model, plan=...)`: build the Engine for a model from a Plan.

Each part gets only its slice of the plan, keyword-only: the process groups from
`plan.world`/`plan.parallel`, the ZeRO stage from `plan.zero`, where the master, optimizer
state and stage-3 partition live from `plan.offload` (swap paths are checked before anything
is built), the optimizer from `plan.optimizer`/`plan.kernels`, the schedule from
`plan.scheduler`, the loss scaler from `plan.precision`, activation checkpointing from
`plan.activation_checkpointing` (installed into the model's checkpoint hook), the parameter
groups from `model_parameters` / `optimizer` / `lr_scheduler` and `plan.optimizer`
(client_optim.py, param_groups.py). A model built on the meta device is materialised here,
only this rank's shard at ZeRO-3 (meta_init.py).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Plan, Problem

from .checkpointing import ActivationCheckpointing, install as install_checkpointing
from .client_optim import ClientOptimizer
from .comm import Collectives, CommsLogger, world_collectives
from .dist import init_distributed
from .engine import Engine
from .from_config import plan_from_config
from .gathered import attach_engine
from .host_memory import fix_mmap_threshold
from .meta_init import check_meta_model, materialize_shard, materialize_whole, meta_tensors
from .offload import Offload
from .pipeline_support import check_pipeline
from .param_groups import GroupStepper
from .parallel import apply_tensor_parallel, default_plan, sync_tp_replicas, tp_collectives
from .metrics import StepReporter
from . import model_info
from .model_info import ModelInfoRun
from .monitor import Monitors
from .parallel.pipeline_engine import PipelineEngine, build_stage
from .precision import DTYPES, build_loss_scaler
from .run_env import PLAN_ENV
from .schedulers import build_schedule
from .zero import build_zero, shard_numel

def resolve_plan(plan: Plan | str | Path | None) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if plan is None:
        path = os.environ.get(PLAN_ENV)
        if not path:
            raise ConfigError(Problem("plan", f"no plan given and ${PLAN_ENV} is not set",
                                      suggestion="pass plan=PATH, or launch with `zeroplan train PLAN -- script.py`"))
        plan = path
    return Plan.load(plan)


def initialize(model: nn.Module, *, plan: Plan | str | Path | None = None,
               config: str | Path | Mapping[str, Any] | None = None,
               model_spec: ModelSpec | str | Path | None = None,
               cluster: ClusterSpec | str | Path | None = None,
               tp_plan: Mapping[str, Any] | None = None, model_parameters: Iterable | None = None,
               optimizer: Any = None, lr_scheduler: Any = None) -> Engine | ModelInfoRun:
    """Shard `model` as `plan` says and return the Engine that trains it.

    `config=` (a config file or dict whose fields are all concrete) is compiled into the plan
    here, for any nn.Module: see from_config.py for its shape, `model_spec=` and `cluster=`.
    `model_parameters`, `optimizer` and `lr_scheduler` are deepspeed.initialize's: parameters
    or param groups, a torch AdamW/Adam/SGD (or a callable building one) whose groups and
    hyper-parameters zeroplan steps on its shards, and a torch LR scheduler over it (or a
    callable); client_optim.py says what each may be. Initialises torch.distributed
    from the torchrun environment when it is not yet (gloo on CPU, NCCL on CUDA; one process
    needs no launcher). Every rank's parameters and buffers are made equal to rank 0's first.
    A model built on the meta device (`with torch.device("meta"):`) is initialised here as an
    eager build under rank 0's generator state would be, each rank materialising only its
    ZeRO-3 shard (meta_init.py says what is guaranteed).

    With plan.parallel.tp > 1 the model is split by `tp_plan` (module-name pattern -> 'colwise',
    'rowwise' or 'vocab', or Hugging Face's style names; see parallel/tensor_plan.py), by default
    the model's own: GPT_PLAN for the built-in GPT, a Hugging Face model's `tp_plan` (GPT-2:
    GPT2_BASE_PLAN; parallel/hf_plan.py), a `tp_plan` attribute for others. Each tp rank keeps
    its slice of the full model built on every rank, and ZeRO then shards the slices over the dp
    group.

    Only in the model-info run of `zeroplan autotune --script`, a process started as `python -m
    zeroplan.runtime.rank --model-info FILE script.py`, this returns a stand-in that measures
    the model at its first forward and ends the run (model_info.py). Under `zeroplan train
    --steps N --metrics FILE -- script.py` the engine reports steps and stops (metrics.py;
    run_env.py lists the variables a launch sets).
    """
    if (output := model_info.requested()) is not None:
        return ModelInfoRun(model, output=output)
    client = ClientOptimizer(model=model, model_parameters=model_parameters, optimizer=optimizer,
                             lr_scheduler=lr_scheduler)
    if config is not None:
        if plan is not None:
            raise ConfigError(Problem("config", "give plan= or config=, not both"))
        plan = plan_from_config(config, model=model, model_spec=model_spec, cluster=cluster, client=client)
    plan = resolve_plan(plan)
    check_pipeline(plan)
    meta = bool(meta_tensors(model))
    if meta:
        check_meta_model(model, plan=plan)
    param_groups = client.bind(plan)  # by the user's parameter names: tensor parallelism replaces parameters
    whole_model = model
    if plan.world.device == "cpu":  # resident memory follows the tensors the plan counts
        fix_mmap_threshold()
    precision, zero_stage = plan.precision, plan.zero.stage
    param_dtype = DTYPES[precision.param_dtype]
    offload = Offload(offload=plan.offload, zero=plan.zero, optimizer=plan.optimizer, kernels=plan.kernels,
                      cuda=plan.world.device == "cuda")
    offload.preflight(numel=shard_numel(model, stage=zero_stage, world=plan.parallel.dp),
                      param_itemsize=torch.empty((), dtype=param_dtype).element_size(),
                      ranks_per_node=plan.world.nproc_per_node)
    groups = init_distributed(world=plan.world, parallel=plan.parallel, layout=plan.layout)
    coll = Collectives(group=groups.dp_group, logger=CommsLogger())
    model, pipe_stage, tp_coll = _place_model(model, plan=plan, groups=groups, coll=coll, tp_plan=tp_plan, meta=meta)
    # With sequence parallelism a block's input is already this rank's 1/tp (of the sequence):
    # partition_activations keeps it as it is rather than slicing it again.
    checkpointing = ActivationCheckpointing(plan=plan.activation_checkpointing,
                                            tp_coll=None if plan.parallel.sequence_parallel else tp_coll)
    install_checkpointing(model, checkpointing)
    zero = build_zero(model=model, zero=plan.zero, coll=coll, device=groups.device, param_dtype=param_dtype,
                      reduce_dtype=DTYPES[precision.reduce_dtype],
                      predivide=_predivide(plan, dp=groups.dp_size),
                      accumulation=plan.batch.gradient_accumulation_steps,
                      place_master=offload.place_master, param_store=offload.param_store,
                      materialize=functools.partial(materialize_shard, model, coll=coll, device=groups.device)
                      if meta and zero_stage == 3 else None)
    master = offload.master_optimizer(zero)
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=plan.optimizer)
    scaler = build_loss_scaler(loss_scaling=precision.loss_scaling, param_dtype=precision.param_dtype)
    stepper = GroupStepper(param_groups=param_groups.holder.param_groups, group_of=param_groups.group_of(whole_model),
                           plan=plan.optimizer, layout=zero.layout, coll=coll, device=groups.device)
    coll.logger.reset()
    world_coll = world_collectives(coll=coll, spans_world=groups.tp_size == groups.pp_size == 1)
    parts = dict(model=model, plan=plan, groups=groups, coll=coll, world_coll=world_coll, zero=zero, optimizer=master,
                 schedule=schedule, scaler=scaler, param_dtype=param_dtype, tp_coll=tp_coll, stepper=stepper,
                 param_groups=param_groups)
    engine = Engine(**parts) if pipe_stage is None else PipelineEngine(pipe_stage=pipe_stage, **parts)
    engine.reporter = StepReporter.from_env(rank=groups.rank)
    engine.monitors = _start_monitors(plan, groups=groups)
    engine.checkpointing = checkpointing
    attach_engine(engine)
    return engine


def _place_model(model: nn.Module, *, plan: Plan, groups, coll: Collectives,
                 tp_plan: Mapping[str, Any] | None, meta: bool = False) -> tuple[nn.Module, Any, Collectives | None]:
    """Move `model` to the device, make every rank's copy rank 0's, split it over tp and, with
    pp, keep this rank's pipeline stage: (the module this rank trains, its pipeline stage or None, the
    tp group's collectives or None). A `meta` model (tp = pp = 1: check_meta_model) is made whole
    at stages 0-2, equal on every rank with nothing to broadcast, and left on meta at stage 3,
    where build_zero materialises this rank's shards."""
    if meta:
        if plan.zero.stage < 3:  # the ZeRO stage
            materialize_whole(model, coll=coll, device=groups.device)
        return model, None, None
    model.to(groups.device)
    if groups.pp_size > 1:  # every stage, and both copies of a tied weight, from rank 0's model
        _broadcast_whole(model)
    tp_coll = _tensor_parallel(model, groups=groups, logger=coll.logger, tp_plan=tp_plan,
                               sequence_parallel=plan.parallel.sequence_parallel)
    if groups.pp_size == 1:  # with pp the whole-model broadcast above already made every rank equal
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                coll.broadcast(t.data, src=0)
        return model, None, tp_coll
    pipe_stage = build_stage(model, groups=groups, method=plan.parallel.pipeline_partition_method)
    return pipe_stage.module, pipe_stage, tp_coll


def _predivide(plan: Plan, *, dp: int) -> float:
    """What gradients are divided by before their reduction (the rest of the 1/dp average comes
    after it), as DeepSpeed does: `prescale_gradients` divides by dp before and nothing after;
    otherwise by `gradient_predivide_factor` before and by dp / factor after."""
    return float(dp) if plan.optimizer.prescale_gradients else plan.optimizer.gradient_predivide_factor


def _start_monitors(plan: Plan, *, groups) -> Monitors:
    """Rank 0's monitors; every rank raises when rank 0 cannot start one (a missing client, a
    W&B run without login), rather than waiting for it in the first collective."""
    error = None
    try:
        monitors = Monitors.from_plan(plan.monitors, rank=groups.rank)
    except ConfigError as e:
        error, monitors = e, Monitors(backends=[])
    failed = torch.tensor([1.0 if error else 0.0], device=groups.device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item():
        raise error or ConfigError(Problem("monitors", "rank 0 could not start the plan's monitors; its error "
                                           "names the block"))
    return monitors


def _broadcast_whole(model: nn.Module) -> None:
    """Rank 0's whole model to every rank, before tp slices it and pp cuts it into stages."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(t.data, src=0)


def _tensor_parallel(model: nn.Module, *, groups, logger: CommsLogger, tp_plan: Mapping[str, Any] | None,
                     sequence_parallel: bool) -> Collectives | None:
    """Split `model` over the tp group (in place): the tp ranks' full copies are made equal
    first, so every slice comes from one initialisation. None when tp = 1 (where sequence
    parallelism has nothing to split: no effect, as in Megatron-LM). Sequence parallelism is
    the built-in GPT's layout only (parallel/sequence.py): a tp_plan of one's own is refused."""
    if groups.tp_size == 1:
        return None
    if sequence_parallel and tp_plan is not None:
        raise ConfigError(Problem("parallel.sequence_parallel", "sequence parallelism uses the built-in GPT's own "
                                  "plan; a tp_plan passed to initialize cannot say which replicated parameters see "
                                  "only part of the sequence", given=True,
                                  suggestion="leave out tp_plan, or compile with parallel.sequence_parallel false"))
    plan = tp_plan if tp_plan is not None else default_plan(model, tp=groups.tp_size,
                                                            sequence_parallel=sequence_parallel)
    if not plan:
        raise ConfigError(Problem("parallel.tp", f"tp({groups.tp_size}) > 1 needs a tensor-parallel plan for "
                                  f"{type(model).__name__}", suggestion="pass initialize(model, tp_plan={'layer.*.fc': "
                                  "'colwise', 'layer.*.out': 'rowwise', ...}), give the model a tp_plan attribute, "
                                  "or compile with parallel.tp = 1"))
    tp_coll = tp_collectives(group=groups.tp_group, logger=logger)
    sync_tp_replicas(model, tp_coll)
    apply_tensor_parallel(model, plan=plan, coll=tp_coll, sequence_parallel=sequence_parallel)
    return tp_coll

