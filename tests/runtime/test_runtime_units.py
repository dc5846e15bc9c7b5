"""Single-process units: schedules, the loss scaler, the layout, the built-in model and data."""

from __future__ import annotations

import math

import pytest
import torch

from rt_plans import make_plan
from zeroplan.runtime.models import GPT, MarkovChainData
from zeroplan.runtime.precision import DynamicLossScaler, LossScaleAtMinimum
from zeroplan.runtime.schedulers import OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR
from zeroplan.runtime.grad_norm import squared_norm_of_runs
from zeroplan.runtime.zero.comm import BucketReducer, read_rows, write_rows
from zeroplan.runtime.zero.layout import ShardLayout
from zeroplan.schemas import MODEL_PRESETS, ConfigError


def _at(schedule, it: int) -> float:
    schedule.last_batch_iteration = it
    return schedule.lr()


# -- schedules: values from DeepSpeed's formulas (deepspeed/runtime/lr_schedules.py) by hand ----
def test_warmup_lr_log_and_linear():
    log = WarmupLR(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="log")
    assert log.lr() == 0.0  # before the first step: warmup_min_lr
    assert _at(log, 0) == 0.0  # log(1) = 0
    assert _at(log, 4) == pytest.approx(1e-3 * math.log(5) / math.log(10))
    assert _at(log, 9) == pytest.approx(1e-3) and _at(log, 50) == pytest.approx(1e-3)
    lin = WarmupLR(warmup_min_lr=1e-4, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="linear")
    assert _at(lin, 4) == pytest.approx(1e-4 + 9e-4 * 0.4)


def test_warmup_decay_lr():
    s = WarmupDecayLR(total_num_steps=20, warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10,
                      warmup_type="linear")
    assert _at(s, 5) == pytest.approx(5e-4)
    assert _at(s, 15) == pytest.approx(5e-4)  # (20 - 15) / (20 - 10)
    assert _at(s, 25) == 0.0


def test_warmup_cosine_lr_ratios():
    s = WarmupCosineLR(base_lr=1e-3, total_num_steps=20, warmup_min_ratio=0.0, warmup_num_steps=10,
                       cos_min_ratio=1e-4, warmup_type="linear")
    assert s.lr() == 0.0
    assert _at(s, 5) == pytest.approx(5e-4)
    cosine = (1 + math.cos(math.pi * 0.1)) / 2  # first post-warm-up step: progress 1/10
    assert _at(s, 10) == pytest.approx(1e-3 * (1e-4 + (1 - 1e-4) * cosine))
    assert _at(s, 19) == pytest.approx(1e-7) and _at(s, 40) == pytest.approx(1e-7)


def test_one_cycle_lr_momentum_and_decay():
    s = OneCycle(cycle_min_lr=1e-4, cycle_max_lr=1e-3, decay_lr_rate=0.5, cycle_first_step_size=4,
                 cycle_second_step_size=None, cycle_first_stair_count=0, cycle_second_stair_count=None,
                 decay_step_size=2, cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.0)
    assert s.lr() == pytest.approx(1e-4) and s.beta1() == 0.8
    assert _at(s, 1) == pytest.approx(5.5e-4)
    assert _at(s, 3) == pytest.approx(1e-3) and s.beta1() == pytest.approx(0.8)
    assert _at(s, 5) == pytest.approx(5.5e-4) and s.beta1() == pytest.approx(0.85)
    assert _at(s, 9) == pytest.approx(1e-4 / 1.5)  # decay: 2 steps past the cycle, interval 1
    stairs = OneCycle(cycle_min_lr=0.0, cycle_max_lr=1.0, decay_lr_rate=0.0, cycle_first_step_size=4,
                      cycle_second_step_size=None, cycle_first_stair_count=2, cycle_second_stair_count=None,
                      decay_step_size=0, cycle_momentum=False, cycle_min_mom=0.8, cycle_max_mom=0.9,
                      decay_mom_rate=0.0)
    assert [_at(stairs, i) for i in range(4)] == [0.0, 0.5, 0.5, 1.0]


# -- the loss scaler: DeepSpeed's DynamicLossScaler.update_scale --------------------------------
def test_overflow_spends_hysteresis_then_halves():
    s = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=3, min_scale=1.0, delayed_shift=2,
                          consecutive_hysteresis=False)
    s.update_scale(True)
    assert s.loss_scale == 2.0 ** 16 and s.cur_hysteresis == 1
    s.update_scale(True)
    assert s.loss_scale == 2.0 ** 15
    s.update_scale(True)
    assert s.loss_scale == 2.0 ** 14


def test_scale_grows_after_window_and_refills_hysteresis():
    s = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=3, min_scale=1.0, delayed_shift=2,
                          consecutive_hysteresis=False)
    s.update_scale(True)
    s.update_scale(True)
    assert s.loss_scale == 2.0 ** 15
    s.update_scale(False)
    s.update_scale(False)
    assert s.loss_scale == 2.0 ** 15 and s.cur_hysteresis == 1
    s.update_scale(False)
    assert s.loss_scale == 2.0 ** 16 and s.cur_hysteresis == 2
    for _ in range(3):
        s.update_scale(False)
    assert s.loss_scale == 2.0 ** 17


def test_consecutive_hysteresis_refills_after_every_clean_step():
    s = DynamicLossScaler(init_scale=8.0, scale_window=100, min_scale=1.0, delayed_shift=2,
                          consecutive_hysteresis=True)
    for _ in range(5):
        s.update_scale(True)
        s.update_scale(False)
    assert s.loss_scale == 8.0


def test_overflow_at_min_scale_raises():
    s = DynamicLossScaler(init_scale=2.0, scale_window=10, min_scale=1.0, delayed_shift=1,
                          consecutive_hysteresis=False)
    s.update_scale(True)
    assert s.loss_scale == 1.0
    with pytest.raises(LossScaleAtMinimum, match="min_loss_scale"):
        s.update_scale(True)


# -- layout and bucket buffers -------------------------------------------------------------------
def test_layout_pads_and_buckets():
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate((5, 7, 1, 12))]
    layout = ShardLayout(params=params, world=4)
    assert [s.chunk for s in layout.slots] == [2, 2, 1, 3] and layout.numel == 8
    assert layout.buckets(16, reverse=True) == [(2, 4), (0, 2)]
    assert layout.buckets(1, reverse=False) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layout.runs([3, 0, 1]) == [(0, 2), (3, 4)]
    region = torch.full((4, 2), -1.0)
    write_rows(region, torch.arange(5.0))
    assert region.tolist() == [[0, 1], [2, 3], [4, 0], [0, 0]]
    assert read_rows(region, 5).tolist() == [0, 1, 2, 3, 4]


def test_in_place_reduction_refuses_buckets_that_are_not_the_gradient_buffer():
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate((5, 7))]
    common = dict(bucket_size=16, overlap=False, predivide=1.0, source=lambda i: None, coll=None, in_place=True)
    with pytest.raises(ValueError, match="W=2"):  # a sharded layout's buckets are rank-major copies
        BucketReducer(layout=ShardLayout(params=params, world=2), reduce_dtype=torch.float32, scatter=False,
                      grad_shard=torch.zeros(6), accumulate=False, **common)
    with pytest.raises(ValueError, match="bfloat16"):  # reducing in another dtype needs a copy
        BucketReducer(layout=ShardLayout(params=params, world=1), reduce_dtype=torch.bfloat16, scatter=False,
                      grad_shard=torch.zeros(12), accumulate=False, **common)


# -- gradient norm ---------------------------------------------------------------------------------
def test_squared_norm_of_runs_sums_in_float64_across_chunks():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=g) * 1e3
    runs = [(0, 10), (15, 1000)]
    want = sum(float((flat[lo:hi].double() ** 2).sum()) for lo, hi in runs)
    got = squared_norm_of_runs(flat, runs, chunk=64)
    assert got.dtype == torch.float64 and math.isclose(float(got), want, rel_tol=1e-13)
    assert float(squared_norm_of_runs(flat, [])) == 0.0


# -- built-in model and data ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "small", "medium"])
def test_gpt_has_exactly_the_spec_parameter_count(preset):
    spec = MODEL_PRESETS[preset]
    with torch.device("meta"):
        model = GPT(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.total_params
    assert model.lm_head.weight is model.wte.weight


def test_gpt_rejects_llama_specs():
    with pytest.raises(ValueError, match="gpt preset"):
        GPT(MODEL_PRESETS["1b"])


def test_global_batch_does_not_depend_on_layout():
    data = MarkovChainData(vocab=50, seq_len=6, seed=3)
    whole = data.micro_batches(step=2, global_batch_size=12, micro_batch_size=12, dp=1, dp_rank=0)[0]
    for dp, micro in ((2, 3), (4, 1), (3, 2)):
        per_rank = [data.micro_batches(step=2, global_batch_size=12, micro_batch_size=micro, dp=dp, dp_rank=r)
                    for r in range(dp)]
        accum = 12 // (dp * micro)
        rows = torch.cat([per_rank[r][k]["input_ids"] for k in range(accum) for r in range(dp)])
        assert torch.equal(rows, whole["input_ids"])
    assert torch.equal(whole["labels"][:, :-1], whole["input_ids"][:, 1:])


def test_markov_data_is_learnable():
    data = MarkovChainData(vocab=2048, seq_len=16)
    assert data.entropy < 0.2 * math.log(2048)
    tokens = data.global_batch(0, 4)
    nxt = data.successors[tokens[:, :-1]]
    assert (nxt == tokens[:, 1:, None]).any(-1).all(), "every token follows one of its successors"


# -- errors name the key and what to do ------------------------------------------------------------
def test_world_without_launcher_is_a_clear_error():
    from zeroplan.runtime.dist import init_distributed

    plan = make_plan(stage=1, world=2)
    with pytest.raises(ConfigError, match="world.world_size.*torchrun"):
        init_distributed(world=plan.world, parallel=plan.parallel, layout=plan.layout)


def test_topology_lays_out_tp_fastest_then_dp_then_pp():
    from zeroplan.runtime.parallel import Topology

    topo = Topology(dp=2, tp=2, pp=2)
    assert topo.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.coords(5) == {"pp": 1, "dp": 0, "tp": 1}
    assert all(topo.rank_of(**topo.coords(r)) == r for r in range(8))
    with pytest.raises(ValueError, match="rank 8 outside"):
        topo.coords(8)


# -- the optimizer interface a native kernel plugs into ------------------------------------------
def _python_adam_step(*, param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled,
                      bias_correction=True, grad_scale=1.0, bf16_out=None):
    """The kernel contract (zeroplan.runtime.kernels.adam_step), written out in torch (with
    bias correction, as the plans of this test ask)."""
    assert bias_correction
    grad = grad / grad_scale
    if decoupled:
        param.mul_(1 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


@pytest.mark.parametrize("decoupled", [True, False])
def test_kernel_adam_interface_matches_torch_adam(decoupled):
    from zeroplan.runtime.optim import KernelAdam, TorchAdam
    from zeroplan.schemas.plan import OptimizerPlan

    plan = OptimizerPlan(type="AdamW" if decoupled else "Adam", lr=1e-2, weight_decay=0.1,
                         decoupled_weight_decay=decoupled)
    torch.manual_seed(0)
    start = torch.randn(37)
    a, b = start.clone(), start.clone()
    torch_adam = TorchAdam(fused=False, plan=plan, numel=37, device=torch.device("cpu"))
    kernel = KernelAdam(adam_step=_python_adam_step, plan=plan, numel=37, device=torch.device("cpu"))
    for _ in range(3):
        grad = torch.randn(37)
        torch_adam.step(param=a, grad=grad, lr=1e-2)
        kernel.step(param=b, grad=grad, lr=1e-2)
    assert torch.allclose(a, b, atol=1e-6)
    assert set(torch_adam.state_tensors()) == set(kernel.state_tensors())
