"""Every optimizer type and kernel name a plan can hold builds a working flat-shard optimizer."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from zeroplan.runtime.kernels import KernelWarning, resolve_optimizer_kernel
from zeroplan.runtime.optim import OPTIMIZER_BUILDERS, FlatOptimizer, build_optimizer
from zeroplan.runtime.optim_lamb import ShardSegments
from zeroplan.runtime.param_groups import HYPER
from zeroplan.schemas.optim import OPTIMIZER_DEFAULTS, OPTIMIZER_PARAMS, OPTIMIZERS
from zeroplan.schemas.plan import OPTIMIZER_KERNELS, KernelsPlan, OptimizerPlan


def test_each_optimizer_name_is_defined_once_and_known_everywhere():
    assert set(OPTIMIZER_BUILDERS) == set(OPTIMIZERS) == set(OPTIMIZER_DEFAULTS) == set(OPTIMIZER_PARAMS)
    assert set(HYPER) == set(OPTIMIZERS)
    assert set(OptimizerPlan.model_json_schema()["properties"]["type"]["enum"]) == set(OPTIMIZERS)
    assert KernelsPlan.model_json_schema()["properties"]["optimizer"]["enum"] == list(OPTIMIZER_KERNELS)


@pytest.mark.parametrize(("kind", "kernel"), list(itertools.product(OPTIMIZERS, OPTIMIZER_KERNELS)))
def test_every_type_and_kernel_builds_and_steps_one_shard(cpu_adam_ext, kind, kernel):
    """On this CPU the kernel resolves to one that runs here (cuda_fused falls back, loudly); the
    built optimizer is a FlatOptimizer that moves the weights by a finite step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelWarning)
        runnable = resolve_optimizer_kernel(kernel, device="cpu")
    numel = 37
    opt = build_optimizer(optimizer=OptimizerPlan(type=kind, lr=1e-2, weight_decay=0.01),
                          kernels=KernelsPlan(optimizer=runnable), numel=numel, device=torch.device("cpu"),
                          segments=ShardSegments(lengths=(numel,)))
    assert isinstance(opt, FlatOptimizer)
    assert set(opt.state) == set(opt.state_names)
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(numel, generator=gen)
    before = param.clone()
    for _ in range(2):
        opt.step(param=param, grad=torch.randn(numel, generator=gen), lr=1e-2)
    assert torch.isfinite(param).all()
    assert not torch.equal(param, before)
