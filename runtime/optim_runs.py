"""Stepping a rank's flat shard range by range, as torch.optim steps parameter by parameter.

torch.optim steps each parameter with its group's hyper-parameters and its own step count,
and leaves a parameter whose `.grad` is None as it is, state included. On the flat shard a
parameter is one chunk, so the Engine (param_groups.py) describes a step as `Run`s: maximal
shard ranges whose elements share a group and a step count. The masters step their shard, or
each NVMe tile, run by run (`update_runs`); an element outside every run is not touched.

Lamb's update is not element-wise (its trust ratio needs each tensor whole), so it steps the
whole shard as one run with each tensor's step count (`segment_steps`), and the ranges of
parameters it must leave alone (`keep`) are copied back afterwards, parameters and state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from zeroplan.schemas.plan import OptimizerPlan

from .optim import FlatOptimizer


@dataclass(frozen=True)
class Run:
    """Shard range [lo, hi) stepped in one `update` call."""

    lo: int
    hi: int
    plan: OptimizerPlan
    """The group's hyper-parameters (weight decay, betas, eps); the learning rate is `lr`."""
    lr: float
    beta1: float | None
    """A scheduled beta1 (OneCycle), else None: the plan's."""
    steps_before: int | None
    """Steps these elements took before this one (torch's per-parameter count); None: the
    optimizer's own count for the whole shard."""
    segment_steps: tuple[int, ...] | None = None
    """A whole-shard run: each tensor's steps before this one, when they differ."""


def update_runs(optimizer: FlatOptimizer, *, param: torch.Tensor, grad: torch.Tensor,
                state: dict[str, torch.Tensor], runs: list[Run], keep: list[tuple[int, int]] = (),
                offset: int = 0) -> None:
    """Update `param` (shard range [offset, offset + len(param)), with its `grad` and element-wise
    `state`) run by run; the ranges in `keep` are as they were afterwards. Call between the
    optimizer's begin_step and end_step."""
    end = offset + param.numel()
    kept = []
    for lo, hi in keep:
        a, b = max(lo, offset) - offset, min(hi, end) - offset
        if a < b:
            kept.append((a, b, param[a:b].clone(), {k: v[a:b].clone() for k, v in state.items()}))
    for run in runs:
        a, b = max(run.lo, offset) - offset, min(run.hi, end) - offset
        if a >= b:
            continue
        with _configured(optimizer, run):
            optimizer.update(param=param[a:b], grad=grad[a:b], state={k: v[a:b] for k, v in state.items()},
                             lr=run.lr, beta1=run.beta1)
    for a, b, values, saved in kept:
        param[a:b].copy_(values)
        for k, v in saved.items():
            state[k][a:b].copy_(v)


@contextlib.contextmanager
def _configured(optimizer: FlatOptimizer, run: Run):
    """The optimizer with the run's hyper-parameters and step count for one `update`, its own after."""
    plan, counters = optimizer.plan, optimizer.counters()
    saved = {k: t.clone() for k, t in counters.items()}
    optimizer.plan, optimizer.segment_steps = run.plan, run.segment_steps
    if run.steps_before is not None:
        for name, value in optimizer.counters_at(run.steps_before).items():
            counters[name].fill_(value)
    try:
        yield
    finally:
        optimizer.plan, optimizer.segment_steps = plan, None
        for name, value in saved.items():
            counters[name].copy_(value)
