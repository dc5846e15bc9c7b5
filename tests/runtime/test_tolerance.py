"""The premises of rt_tolerance, checked: the key bias really gets no gradient, Adam's step bound
holds for every gradient sequence (and is reached), the bounds absorb a change of vector unit,
and they still fail a run that lost a reduction or a step."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rt_cases import build, case_plan, micro_batch, mismatches, reference_micro
from rt_tolerance import adam_step_bound, gradient_free_elements, noise_drift_bound
from zeroplan.schemas.plan import OptimizerPlan

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)

HERE = Path(__file__).parent
BF16_CASE = dict(id="bf16", model="gpt", stage=2, world=2, accum=3, dtype="bf16")
ADAM_L2_CASE = dict(id="adam-l2", model="gpt", stage=0, world=2, accum=1, optimizer=OptimizerPlan(
    type="Adam", lr=3e-3, weight_decay=0.1, decoupled_weight_decay=False, gradient_clipping=0.5))


def test_only_the_key_bias_gets_no_gradient(one_thread):
    """In float64 the key third of every qkv bias has a gradient at rounding level, while the
    query and value thirds, and every other parameter, have gradients of ordinary size."""
    model = build("gpt").double()
    batch = micro_batch(dict(model="gpt", stage=0, world=1, accum=1), 0, 0, 0)
    model(**batch).backward()
    free = gradient_free_elements(model)
    assert sorted(free) == [f"blocks.{i}.attn.qkv.bias" for i in range(len(model.blocks))]
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for name, p in model.named_parameters():
        mask = free.get(name, torch.zeros(p.numel(), dtype=torch.bool))
        grad = p.grad.flatten()
        if mask.any():
            assert grad[mask].abs().max().item() <= 1e-12 * scale, name
        assert grad[~mask].abs().max().item() >= 1e-6 * scale, name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e3, max_value=1e3), min_size=1, max_size=12))
def test_adam_never_steps_further_than_the_bound(grads):
    """torch.optim.Adam on one element, any gradient sequence: |step| <= lr * adam_step_bound."""
    lr, betas = 1.0, (0.9, 0.999)
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr, betas=betas, eps=1e-8)
    for t, g in enumerate(grads, start=1):
        before = p.item()
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        assert abs(p.item() - before) <= lr * adam_step_bound(t, betas=betas) * (1 + 1e-12)


def test_the_bound_is_reached():
    """Cauchy-Schwarz is tight: gradients proportional to (b1/b2)^(t-i) take Adam to the bound,
    so the drift bound is the worst case, not a loose guess."""
    betas, t = (0.9, 0.999), 6
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0, betas=betas, eps=1e-30)
    for i in range(1, t + 1):
        before = p.item()
        p.grad = torch.tensor([(betas[0] / betas[1]) ** (t - i)], dtype=torch.float64)
        opt.step()
    assert abs(p.item() - before) == pytest.approx(adam_step_bound(t, betas=betas), rel=1e-9)


def _reference_on_another_vector_unit(case: dict, path: Path) -> dict:
    """reference_micro(case) in a fresh process whose ATen kernels run on another vector unit:
    the scalar path, or this CPU's best when this process already runs the scalar path."""
    code = ("import sys, pickle, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1)\n"
            "from rt_cases import reference_micro\n"
            "torch.save(reference_micro(pickle.loads(bytes.fromhex(sys.argv[2]))), sys.argv[3])\n")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        env["ATEN_CPU_CAPABILITY"] = "default"
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-c", code, str(HERE), pickle.dumps(case).hex(), str(path)], env=env,
                   timeout=300, check=True)
    return torch.load(path)


@pytest.mark.parametrize("case", [BF16_CASE, ADAM_L2_CASE], ids=lambda c: c["id"])
def test_bounds_hold_across_vector_units(case, one_thread, tmp_path):
    """The same training with ATen's kernels on the scalar path and on this CPU's vector unit:
    the arithmetic differs in the order of nearly every vectorised sum, as between an AVX2 and
    an AVX-512 machine, and the comparison still passes."""
    here = reference_micro(case)
    elsewhere = _reference_on_another_vector_unit(case, tmp_path / "elsewhere.pt")
    assert not mismatches(elsewhere, here, case=case)


@pytest.mark.parametrize("bug", ["lost step", "rank 0's data only", "first micro-batch repeated"])
def test_bf16_bounds_fail_a_broken_run(bug, one_thread, monkeypatch):
    """What a sharding bug does to a bf16 run is far outside the bf16 bounds, in every tensor."""
    good = reference_micro(BF16_CASE)
    import rt_cases

    real = rt_cases.micro_batch
    steps = 5
    if bug == "lost step":
        steps = 4
    elif bug == "rank 0's data only":
        monkeypatch.setattr(rt_cases, "micro_batch", lambda case, step, rank, k: real(case, step, 0, k))
    else:
        monkeypatch.setattr(rt_cases, "micro_batch", lambda case, step, rank, k: real(case, step, rank, 0))
    broken = reference_micro(BF16_CASE, steps=steps)
    failures = mismatches(broken, good, case=BF16_CASE)
    trainable = [n for n, p in build("gpt").named_parameters() if p.requires_grad]
    assert len({f.split(":")[0] for f in failures}) == len(trainable), failures


def test_drift_bound_follows_the_schedule():
    """Twice the sum over steps of lr_t times Adam's largest step, plus the ordinary tolerance."""
    plan = case_plan(dict(model="gpt", stage=0, world=1, accum=1))
    lrs = [1e-4, 1e-4, 1.55e-3, 3e-3, 2.0333333e-3]  # WarmupDecayLR of rt_plans, its first five steps
    want = 2 * sum(lr * adam_step_bound(t, betas=plan.optimizer.betas) for t, lr in enumerate(lrs, start=1))
    assert noise_drift_bound(plan, steps=5) == pytest.approx(want + 1e-5, rel=1e-6)
