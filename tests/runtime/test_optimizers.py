"""Lamb, Lion and Adagrad (and Adam without bias correction) on the flat fp32 shard equal a
per-tensor reference (rt_optimizers.py) at world 1 and 2, stages 0-3 (STYLE 10).

The model is the zoo (rt_cases.Zoo): odd tensor sizes, so every shard has padding and chunks of
many tensors, and no element whose gradient is analytically zero. Lion's sign and Adagrad's
and Lamb's normalised steps turn such an element's rounding noise into a full learning rate of
either sign, where no summation order can agree (rt_tolerance explains it for Adam); here every
element is held to PARAM_TOL. Lamb's per-tensor trust ratio is exercised where a tensor is cut
over both ranks (stages 1-3), with cpu offload, and with its options (bias correction off,
eps inside the square root, clamps that bind).
"""

from __future__ import annotations

import functools

import pytest

from rt_cases import mismatches, reference_micro
from rt_spawn import job_result, spawn_jobs
from zeroplan.schemas.plan import OffloadPlan, OffloadTarget, OptimizerPlan

pytestmark = pytest.mark.numerics

LAMB = OptimizerPlan(type="Lamb", lr=2e-2, weight_decay=0.01, gradient_clipping=0.5)
LAMB_OPTIONS = OptimizerPlan(type="Lamb", lr=2e-2, weight_decay=0.01, bias_correction=False, eps_inside_sqrt=True,
                             max_coeff=2.0, min_coeff=0.5, gradient_clipping=0.5)
LION = OptimizerPlan(type="Lion", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, gradient_clipping=0.5)
ADAGRAD = OptimizerPlan(type="Adagrad", lr=1e-2, eps=1e-10, weight_decay=0.01, decoupled_weight_decay=False,
                        gradient_clipping=0.5)
ADAM_RAW = OptimizerPlan(type="Adam", lr=3e-3, weight_decay=0.1, bias_correction=False, gradient_clipping=0.5)
CPU = OffloadPlan(optimizer=OffloadTarget(device="cpu"))


def _case(stage: int, world: int, name: str, optimizer: OptimizerPlan, **extra) -> dict:
    tag = "".join(f"-{k}" for k in sorted(extra))
    return dict(id=f"{name}-z{stage}-w{world}{tag}", model="zoo", stage=stage, world=world, accum=3,
                optimizer=optimizer, **extra)


CASES = {
    1: [_case(0, 1, "lamb", LAMB), _case(0, 1, "lion", LION), _case(0, 1, "adagrad", ADAGRAD),
        _case(0, 1, "adam-raw", ADAM_RAW)],
    2: [_case(s, 2, "lamb", LAMB) for s in range(4)]
    + [_case(2, 2, "lamb-options", LAMB_OPTIONS), _case(2, 2, "lamb", LAMB, offload=CPU)]
    + [_case(s, 2, "lion", LION) for s in (1, 3)]
    + [_case(s, 2, "adagrad", ADAGRAD) for s in (2, 3)]
    + [_case(1, 2, "adam-raw", ADAM_RAW)],
}
ALL = [c for cases in CASES.values() for c in cases]


@functools.lru_cache(maxsize=None)
def _spawned(world: int) -> dict:
    return spawn_jobs(world, [(c["id"], "train_case", {"case": c}) for c in CASES[world]])


@pytest.mark.parametrize("case", ALL, ids=[c["id"] for c in ALL])
def test_matches_a_per_tensor_reference(case, one_thread):
    got = job_result(_spawned(case["world"]), case["id"])
    failures = mismatches(got["params"], reference_micro(case), case=case)
    assert not failures, f"{case['id']}: " + "; ".join(failures)
