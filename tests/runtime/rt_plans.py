"""Plans for tests, built directly (the compiler is not needed to test the runtime)."""

from __future__ import annotations

from zeroplan.schemas import Plan
from zeroplan.schemas.batch import BatchPlan
from zeroplan.schemas.plan import (ActivationCheckpointingPlan, KernelsPlan, LoggingPlan, MonitorsPlan, LossScalePlan, OffloadPlan, OptimizerPlan, ParallelPlan,
                                   PrecisionPlan, SchedulerPlan, WorldPlan, ZeroPlan)

WARMUP_DECAY = SchedulerPlan(type="WarmupDecayLR", params={
    "warmup_min_lr": 1e-4, "warmup_max_lr": 3e-3, "warmup_num_steps": 2, "warmup_type": "linear",
    "total_num_steps": 5, "last_batch_iteration": -1})


def make_plan(*, stage: int, world: int, accum: int = 1, micro: int = 2, dtype: str = "fp32",
              reduce_bucket: int = 500, allgather_bucket: int = 1000, overlap: bool = False,
              prefetch: int = 2000, persistence: int = 40, optimizer: OptimizerPlan | None = None,
              scheduler: SchedulerPlan | None = WARMUP_DECAY, loss_scaling: LossScalePlan | None = None,
              offload: OffloadPlan | None = None, kernel: str = "torch_foreach", sub_group: int = 10**9,
              checkpointing: ActivationCheckpointingPlan | None = None, reduce_scatter: bool = True,
              model_persistence: int = 2**63 - 1, max_live: int = 10**9, max_reuse: int = 10**9,
              monitors: MonitorsPlan | None = None, wall_clock: bool = False, comms_logger: bool = False,
              timeout_s: float = 600.0, nonfinite: str = "stop") -> Plan:
    """A concrete plan for `world` CPU ranks, ZeRO `stage`, `accum` micro-batches of `micro`."""
    if optimizer is None:
        optimizer = OptimizerPlan(type="AdamW", lr=3e-3, weight_decay=0.1, gradient_clipping=0.5)
    precision = PrecisionPlan(param_dtype=dtype, reduce_dtype="fp32", nonfinite=nonfinite,
                              loss_scaling=loss_scaling or LossScalePlan(enabled=dtype == "fp16"))
    return Plan(
        world=WorldPlan(nnodes=1, nproc_per_node=world, world_size=world, collective_timeout_s=timeout_s),
        parallel=ParallelPlan(dp=world),
        batch=BatchPlan(global_batch_size=micro * accum * world, micro_batch_size=micro,
                        gradient_accumulation_steps=accum),
        zero=ZeroPlan(stage=stage, reduce_bucket_size=reduce_bucket, allgather_bucket_size=allgather_bucket,
                      overlap_comm=overlap, prefetch_bucket_size=prefetch, param_persistence_threshold=persistence,
                      model_persistence_threshold=model_persistence, max_live_parameters=max_live,
                      max_reuse_distance=max_reuse, sub_group_size=sub_group, reduce_scatter=reduce_scatter),
        precision=precision, optimizer=optimizer, scheduler=scheduler, offload=offload or OffloadPlan(),
        kernels=KernelsPlan(optimizer=kernel),
        activation_checkpointing=checkpointing or ActivationCheckpointingPlan(),
        monitors=monitors or MonitorsPlan(), logging=LoggingPlan(wall_clock_breakdown=wall_clock, comms_logger=comms_logger))
