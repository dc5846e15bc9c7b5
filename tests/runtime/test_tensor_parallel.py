"""Tensor parallelism (alone and with ZeRO over the dp group) equals single-process PyTorch.

Each case trains 4 AdamW steps with WarmupDecayLR and gradient clipping at max norm 0.5 (the
global norm is 1.2-1.8, so clipping scales every step) and compares the consolidated export,
which joins the tp slices into the plain model's keys and shapes, with torch.optim.AdamW on
the whole global batch in one process: within 1e-5 in fp32 (only the order of the sums in
the tp and dp all-reduces differs; the GPT's key bias, whose gradient is analytically zero, is
held to the drift bound of rt_tolerance). The test GPT has vocab 97, so the vocabulary split is
uneven (49 + 48 rows). Sequence parallelism (`-sp` cases: ZeRO 0-3 at tp=2, one at dp=2 x tp=2)
is held to the same bounds. Two spawns: tp=2 on 2 processes; dp=2 x tp=2 on 4.
"""

from __future__ import annotations

import functools

import pytest
import torch

from rt_harness import run_distributed
from rt_spawn import job_result
from rt_cases import GLOBAL_BATCH, SPEC
from rt_tolerance import compare
from tp_jobs import STEPS, build_model, reference, tp_plan
from zeroplan.compiler import comm_volume
from zeroplan.compiler.comm import summarize
from zeroplan.runtime.models import GPT
from zeroplan.runtime.parallel import GPT_PLAN, TpSplit, default_plan
from zeroplan.schemas import ConfigError, ModelSpec

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)


def _case(model, stage, dp, tp, accum=1, sp=False):
    return dict(id=f"{model}-z{stage}-dp{dp}-tp{tp}-a{accum}" + ("-sp" if sp else ""), model=model, stage=stage,
                dp=dp, tp=tp, accum=accum, sp=sp)


SP = [_case("gpt", 0, 1, 2, sp=True), _case("gpt", 1, 1, 2, accum=2, sp=True), _case("gpt", 2, 1, 2, sp=True),
      _case("gpt", 3, 1, 2, accum=2, sp=True)]
TRAIN = {
    2: [_case("gpt", 0, 1, 2), _case("gpt", 1, 1, 2, accum=3), _case("tiny", 2, 1, 2), *SP],
    4: [_case("gpt", 0, 2, 2), _case("gpt", 1, 2, 2), _case("gpt", 2, 2, 2, accum=3), _case("gpt", 3, 2, 2),
        _case("tiny", 3, 2, 2, accum=2), _case("gpt", 2, 2, 2, accum=2, sp=True)],
}
ALL = [c for cases in TRAIN.values() for c in cases]
CHECKPOINT = _case("gpt", 2, 2, 2)


def _jobs(world: int) -> list:
    jobs = [(c["id"], "train_tp", {"case": c}) for c in TRAIN[world]]
    jobs.append((f"ce{world}", "vocab_cross_entropy", {}))
    if world == 2:
        jobs += [("grads", "replicated_grads", {"case": _case("gpt", 0, 1, 2)}), ("bad", "bad_plans", {}),
                 ("sp-refused", "sequence_parallel_refusals", {})]
    else:
        jobs.append(("ckpt", "checkpoint_tp", {"case": CHECKPOINT}))
    return jobs


@functools.lru_cache(maxsize=None)
def _spawned(world: int) -> dict:
    from tp_jobs import run_tp_jobs

    return run_distributed(run_tp_jobs, world, _jobs(world), timeout=300)[0]


@functools.lru_cache(maxsize=None)
def _reference(model: str):
    return reference(dict(model=model, stage=0, dp=1, tp=1, accum=1))


@pytest.mark.parametrize("case", ALL, ids=[c["id"] for c in ALL])
def test_matches_single_process(case, one_thread):
    got = job_result(_spawned(case["dp"] * case["tp"]), case["id"])
    want, norms = _reference(case["model"])
    assert set(got["params"]) == set(want), "the export has the plain model's keys"
    for name, value in want.items():
        assert got["params"][name].shape == value.shape, name
    failures = compare(got["params"], want, model=build_model(case["model"]), plan=tp_plan(case), steps=STEPS)
    assert not failures, f"{case['id']}: " + "; ".join(failures)
    assert min(got["norms"]) > 0.5, "clipping must scale every step"
    assert got["norms"] == pytest.approx(norms, rel=1e-5), "each parameter's gradient counted once in the norm"


def test_export_loads_into_the_plain_model(one_thread):
    got = job_result(_spawned(4), "gpt-z2-dp2-tp2-a3")
    torch.manual_seed(0)
    plain = GPT(ModelSpec(name="test", layers=2, hidden=32, heads=2, ffn=128, vocab=97, seq_len=8))
    plain.load_state_dict(got["params"], strict=True)
    assert plain.lm_head.weight is plain.wte.weight


def test_layers_hold_slices():
    shapes = job_result(_spawned(2), "gpt-z0-dp1-tp2-a1")["local_shapes"]
    assert shapes["wte.weight"] == (49, 32)  # rows 0..48 of 97 on tp rank 0
    assert shapes["blocks.0.attn.qkv.weight"] == (48, 32)  # one of two heads of q, k and v
    assert shapes["blocks.0.attn.proj.weight"] == (32, 16)
    assert shapes["blocks.0.fc.weight"] == (64, 32) and shapes["blocks.0.out.weight"] == (32, 64)
    assert shapes["blocks.0.out.bias"] == (32,) and shapes["ln_f.weight"] == (32,)  # replicated


def test_tokens_counted_once_and_tp_comms_per_step():
    got = job_result(_spawned(4), "gpt-z1-dp2-tp2-a1")
    assert got["tokens"] == [12 * 8] * STEPS, "global batch x sequence, not multiplied by tp"
    layers = 2
    forward = 2 * layers + 1 + 2  # two per block, the embedding's sum, the loss's max and sums
    backward = 2 * layers + 1  # two per block, the LM head's input
    assert got["comms"]["tp.all_reduce"]["count"] == forward + backward + 1  # + the gradient norm
    plan = tp_plan(_case("gpt", 1, 2, 2))
    assert summarize(comm_volume(plan, SPEC))[1]["tp.all_reduce"] == forward + backward + 1, "the compiler agrees"


def test_sequence_parallel_comms_per_step():
    """Per micro-batch, each activation all-reduce of plain tp becomes a reduce-scatter or an
    all-gather along the sequence, and each column-parallel layer gathers its input again in
    backward; at the step the replicated gradients are summed over tp."""
    got = job_result(_spawned(2), "gpt-z0-dp1-tp2-a1-sp")
    layers = 2
    gathers = (2 * layers + 1) + (4 * layers + 1 + 1)  # forward: qkv, fc, LM head; backward: + the embedding's
    scatters = (2 * layers + 1) + (2 * layers + 1)  # forward: proj, out, embedding; backward: qkv, fc, LM head
    comms = got["comms"]
    assert comms["tp.all_gather_into_tensor"]["count"] == gathers
    assert comms["tp.reduce_scatter_tensor"]["count"] == scatters
    assert comms["tp.all_reduce"]["count"] == 2 + 1 + 1  # the loss's two, the norm, the replicated gradients
    activation = GLOBAL_BATCH * SPEC.seq_len * SPEC.hidden * 4  # fp32: each moves the whole sequence's bytes
    assert comms["tp.all_gather_into_tensor"]["bytes"] == gathers * activation
    _, calls = summarize(comm_volume(tp_plan(_case("gpt", 0, 1, 2, sp=True)), SPEC))
    assert (calls["tp.all_gather"], calls["tp.reduce_scatter"], calls["tp.all_reduce"]) == (gathers, scatters, 4)


def test_sequence_parallel_needs_the_built_in_gpt_and_a_divisible_sequence():
    got = job_result(_spawned(2), "sp-refused")
    assert "parallel.sequence_parallel: sequence parallelism is implemented for the built-in GPT only, not TinyLM" \
        in got["own model"]
    assert "parallel.sequence_parallel: sequence parallelism uses the built-in GPT's own plan" in got["own plan"]
    assert "parallel.sequence_parallel: sequence length 7 is not divisible by tp(2)" in got["odd sequence"]


def test_replicated_gradients_are_identical_across_tp():
    got = job_result(_spawned(2), "grads")
    assert got["replicated"] and all(same for _, same in got["replicated"]), got["replicated"]
    assert not any(same for _, same in got["split"]), "split gradients are different slices"


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy_equals_torch(world):
    got = job_result(_spawned(world), f"ce{world}")
    for reduction, (loss_rel_diff, grad_diff) in got.items():  # fp32: a few ulps either way
        assert loss_rel_diff <= 1e-6 and grad_diff <= 1e-6, (reduction, loss_rel_diff, grad_diff)


def test_checkpoint_round_trip_dp2_tp2():
    got = job_result(_spawned(4), "ckpt")
    assert got["diff"] == 0.0, "resumed training equals uninterrupted training"
    assert got["resharded_diff"] == 0.0, "loaded at tp 1, the model differs from the one saved at tp 2"


def test_plan_mistakes_are_config_errors():
    got = job_result(_spawned(2), "bad")
    assert "tp_plan['donw']: the pattern matches no module" in got["typo"]
    assert "unknown tensor-parallel style" in got["style"] and "'diagonal'" in got["style"]
    assert "'norm' is a LayerNorm" in got["type"]
    assert "module 'up' matches more than one pattern" in got["overlap"]


def test_gpt_plan_needs_heads_divisible():
    model = GPT(ModelSpec(name="t3", layers=1, hidden=24, heads=2, ffn=48, vocab=11, seq_len=4))
    assert default_plan(model, tp=2) == GPT_PLAN
    with pytest.raises(ConfigError, match=r"tp\(3\) does not divide heads\(2\) of model t3"):
        default_plan(model, tp=3)


def test_split_take_and_merge_are_inverse():
    full = torch.arange(7 * 3 * 2, dtype=torch.float32).view(21, 2)  # [q|k|v] of 7 rows each
    split = TpSplit(dim=0, sizes=(4, 3), fused=3)
    parts = [split.take(full, r) for r in range(2)]
    assert parts[0].shape == (12, 2) and parts[1].shape == (9, 2)
    assert torch.equal(parts[1][:3], full[4:7]) and torch.equal(parts[1][3:6], full[11:14])
    assert torch.equal(split.merge(parts), full)


def test_a_user_model_brings_its_plan_as_an_attribute():
    from tp_jobs import TINY_PLAN, TinyLM

    model = TinyLM()
    assert default_plan(model, tp=2) is None
    model.tp_plan = TINY_PLAN
    assert default_plan(model, tp=2) == TINY_PLAN
