"""Which Plan fields the runtime reads: a rank worker that trains a set of plans covering every
option with field reads traced (through the plans' common base class) and returns them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from zeroplan.schemas.plan import (ActivationCheckpointingPlan, FlopsProfilerPlan, MonitorOutput, MonitorsPlan,
                                   OffloadPlan, OffloadTarget, OptimizerPlan, WandbPlan)
from zeroplan.schemas.types import FrozenModel

import rt_cases
import rt_jobs
import rt_pipeline
import tp_jobs


def _traced(self, name):
    if name in type(self).model_fields:
        _READS.add((type(self).__name__, name))
    return object.__getattribute__(self, name)


_READS: set[tuple[str, str]] = set()


def _variants(root: str) -> list[tuple[str, callable, dict]]:
    """(worker, kwargs) runs whose options together touch every plan field."""
    monitors = MonitorsPlan(tensorboard=MonitorOutput(output_path=os.path.join(root, "tb"), job_name="j"),
                            csv=MonitorOutput(output_path=os.path.join(root, "csv"), job_name="j"),
                            wandb=WandbPlan(project="p", group="g"),
                            flops_profiler=FlopsProfilerPlan(profile_step=1, output_file=os.path.join(root, "flops.txt"),
                                                             peak_flops=1e9, peak_source="measured"))
    nvme = OffloadTarget(device="nvme", nvme_path=root, pin_memory=True, buffer_count=2, buffer_size=4096)
    sgd = OptimizerPlan(type="SGD", lr=1e-3, momentum=0.9, dampening=0.1, nesterov=False, gradient_clipping=0.5)
    adam = OptimizerPlan(type="Adam", lr=1e-3, decoupled_weight_decay=False, prescale_gradients=True)
    lamb = OptimizerPlan(type="Lamb", lr=1e-3, eps_inside_sqrt=True)
    ac = ActivationCheckpointingPlan(enabled=True, partition_activations=True, cpu_checkpointing=True)
    gpt = dict(model="gpt", world=2, accum=1)
    return [
        (rt_jobs.checkpoint_roundtrip, dict(case=dict(gpt, stage=2, dtype="fp16", offload=OffloadPlan(optimizer=nvme),
                                                      kernel="cpu_adam", sub_group=5000),
                                            directory=os.path.join(root, "ckpt"))),
        (rt_cases.train_case, dict(case=dict(gpt, stage=3, optimizer=sgd, reduce_scatter=False, checkpointing=ac,
                                             offload=OffloadPlan(param=OffloadTarget(device="cpu"))), steps=1)),
        (rt_cases.train_case, dict(case=dict(gpt, stage=1, optimizer=adam, dtype="bf16", overlap=True,
                                             monitors=monitors, wall_clock=True), steps=1)),
        (rt_pipeline.pp_train, dict(case=dict(model="gpt", stage=1, dp=1, pp=2, accum=2, schedule="gpipe",
                                              method="uniform"))),
        (tp_jobs.train_tp, dict(case=dict(model="gpt", stage=0, dp=1, tp=2, accum=1, sp=True))),
        (rt_cases.train_case, dict(case=dict(gpt, stage=2, optimizer=lamb, timeout_s=120, nonfinite="skip"),
                                   steps=1)),
        (_static_fp16_without_schedule, dict(case=dict(gpt, stage=0, dtype="fp16", comms_logger=True))),
    ]


def _static_fp16_without_schedule(*, case: dict) -> None:
    """A constant learning rate (no scheduler) and a static fp16 loss scale."""
    from zeroplan.runtime import initialize
    from zeroplan.schemas.plan import LossScalePlan, PrecisionPlan

    plan = rt_cases.case_plan(case).model_copy(update={"scheduler": None, "precision": PrecisionPlan(
        param_dtype="fp16", loss_scaling=LossScalePlan(enabled=True, dynamic=False, static_scale=128.0))})
    engine = initialize(rt_cases.build("gpt"), plan=plan)
    loss = engine(**rt_cases.micro_batch(case, 0, dist.get_rank(), 0))
    engine.backward(loss)
    engine.step()
    engine.close()


def plan_reads(*, root: str) -> set | None:
    """Run every variant with reads traced; rank 0 returns the (section class, field) pairs read
    on any rank."""
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=root, WANDB_SILENT="true")
    FrozenModel.__getattribute__ = _traced
    try:
        for worker, kwargs in _variants(root):
            worker(**kwargs)
    finally:
        del FrozenModel.__getattribute__
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, _READS)
    torch.distributed.barrier()
    return set().union(*every) if dist.get_rank() == 0 else None
