"""Rank workers of the FLOPs profiler tests: the same checkpointed training with and without
the profiler, and what each rank counted."""

from __future__ import annotations

import dataclasses
import os

import torch.distributed as dist

from zeroplan.runtime import initialize
from zeroplan.schemas.plan import ActivationCheckpointingPlan, FlopsProfilerPlan, MonitorsPlan

import rt_cases

CASE = dict(model="gpt", world=2, accum=2, stage=2, checkpointing=ActivationCheckpointingPlan(enabled=True))
PROFILE_STEP, STEPS = 2, 3


def profiler_plan(output_file: str) -> FlopsProfilerPlan:
    return FlopsProfilerPlan(profile_step=PROFILE_STEP, module_depth=3, top_modules=2, output_file=output_file,
                             recompute_fwd_factor=1.0, peak_flops=4e10, peak_source="nominal")


def train(*, output_file: str | None) -> dict | None:
    """Train CASE for STEPS steps, profiling step PROFILE_STEP when `output_file` is given; rank 0
    returns the parameters, losses and every rank's count."""
    monitors = MonitorsPlan(flops_profiler=profiler_plan(output_file)) if output_file else MonitorsPlan()
    engine = initialize(rt_cases.build("gpt"), plan=rt_cases.case_plan({**CASE, "monitors": monitors}))
    rank, losses = dist.get_rank(), []
    for step in range(STEPS):
        for k in range(CASE["accum"]):
            loss = engine(**rt_cases.micro_batch(CASE, step, rank, k))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    flops = engine.monitors.flops
    counted = dataclasses.asdict(flops.profile.flops) if flops is not None else None
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, counted)
    params = engine.full_state_dict()
    engine.close()
    if rank == 0:
        files = sorted(os.listdir(os.path.dirname(output_file))) if output_file else []
        return {"params": params, "losses": losses, "counted": every, "files": files}
    return None
