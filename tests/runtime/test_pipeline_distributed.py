"""Pipeline parallelism equals single-process PyTorch (STYLE 10), on 2 and 4 gloo ranks, alone,
with data parallelism (ZeRO 0-2) and with tensor parallelism (tp=2 x pp=2).

Four AdamW steps with clipping (max norm 0.5, exceeded at every step) and WarmupDecayLR on
the same global batch of 12: the consolidated parameters match torch.optim.AdamW in one
process within 1e-5 (fp32; only the order of the gradient sums differs; the key bias is held
to rt_tolerance's drift bound). This holds only if
the stages pass activations and gradients correctly, the tied embedding's two copies get the
summed gradient and the gradient norm counts it once (counting it twice changes every
clipped step). One spawn per world size runs every case of that size.
"""

from __future__ import annotations

import functools
import os

import pytest

from rt_cases import mismatches, reference_global
from rt_pipeline import STEPS, reference_seq
from rt_spawn import job_result, spawn_jobs

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)

FP32_TOL = 1e-5
CLIP = 0.5
REFERENCE_CASE = dict(model="gpt", stage=0, world=1, accum=1)


def _case(model, stage, dp, pp, accum, schedule="1f1b", method="parameters", tp=1):
    return dict(id=f"{model}-z{stage}-dp{dp}-tp{tp}-pp{pp}-a{accum}-{schedule}-{method}", model=model, stage=stage,
                dp=dp, tp=tp, pp=pp, accum=accum, schedule=schedule, method=method)


CASES = {
    2: [_case("gpt", 0, 1, 2, 4, "1f1b"), _case("gpt", 1, 1, 2, 3, "gpipe", "uniform"),
        _case("seq", 0, 1, 2, 4, "1f1b", "type:linear"), _case("seq", 2, 1, 2, 2, "gpipe")],
    4: [_case("gpt", 1, 2, 2, 3, "1f1b"), _case("gpt", 2, 2, 2, 3, "gpipe"), _case("gpt", 0, 1, 4, 6, "1f1b"),
        _case("gpt", 1, 1, 2, 4, "1f1b", tp=2)],
}
ALL = [c for cases in CASES.values() for c in cases]
CKPT = dict(model="gpt", stage=1, dp=2, pp=2, accum=3)


@functools.lru_cache(maxsize=None)
def _spawned(world: int, root: str) -> dict:
    jobs = [(c["id"], "rt_pipeline:pp_train", {"case": c}) for c in CASES[world]]
    if world == 2:
        jobs.append(("plain-seq", "rt_pipeline:refuses_plain_sequential", {}))
    else:
        jobs.append(("ckpt", "rt_pipeline:pp_checkpoint", {"case": CKPT, "directory": os.path.join(root, "ckpt")}))
    return spawn_jobs(world, jobs)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pp"))
    return lambda world: _spawned(world, root)


@functools.lru_cache(maxsize=None)
def _reference(model: str) -> dict:
    if model == "seq":
        return reference_seq()
    return reference_global(REFERENCE_CASE, steps=STEPS)


@pytest.mark.parametrize("case", ALL, ids=[c["id"] for c in ALL])
def test_pipeline_matches_single_process(spawned, case, one_thread):
    got = job_result(spawned(case["dp"] * case["tp"] * case["pp"]), case["id"])
    want = _reference(case["model"])
    assert sorted(got["params"]) == sorted(want), "full_state_dict is not the plain model's state_dict"
    if case["model"] == "gpt":
        failures = mismatches(got["params"], want, case=REFERENCE_CASE, steps=STEPS)
        assert not failures, f"{case['id']}: " + "; ".join(failures)
    else:
        where = max(want, key=lambda k: (got["params"][k] - want[k]).abs().max().item())
        diff = (got["params"][where] - want[where]).abs().max().item()
        assert diff <= FP32_TOL, f"{case['id']}: max |diff| {diff:.3g} at {where}"
    assert min(got["norms"]) > CLIP, "clipping never triggered: the norm is not tested"
    if case["model"] == "gpt":  # both copies of the tied embedding, each from its own stage
        assert (got["params"]["wte.weight"] - got["params"]["lm_head.weight"]).abs().max().item() == 0.0


@pytest.mark.parametrize("case", ALL, ids=[c["id"] for c in ALL])
def test_every_stage_returns_the_loss_and_keeps_the_schedule_bound(spawned, case):
    got = job_result(spawned(case["dp"] * case["tp"] * case["pp"]), case["id"])
    m, pp = case["accum"], case["pp"]
    by_dp: dict[int, set] = {}
    for _stage, dp_rank, _in_flight, losses in got["per_rank"]:
        by_dp.setdefault(dp_rank, set()).add(tuple(losses))
    assert all(len(v) == 1 for v in by_dp.values()), f"stages of one pipeline returned different losses: {by_dp}"
    for stage, _dp_rank, in_flight, _ in got["per_rank"]:
        bound = m if case["schedule"] == "gpipe" else min(pp - stage, m)
        assert in_flight == bound, f"stage {stage} held {in_flight} micro-batches, expected {bound}"
    assert "call engine.train_batch(data_iter)" in got["refused"]
    assert got["comms"]["pp.send"]["count"] > 0


def test_pipeline_losses_fall(spawned):
    got = job_result(spawned(4), CASES[4][0]["id"])
    assert got["losses"][-1] < got["losses"][0]


def test_plain_sequential_is_refused_with_a_pointer_to_pipeline_module(spawned):
    text = job_result(spawned(2), "plain-seq")
    assert text.startswith("ConfigError") and "PipelineModule(layers=..., loss_fn=...)" in text


def test_checkpoint_round_trip_at_dp2_pp2(spawned):
    got = job_result(spawned(4), "ckpt")
    assert got["keys"]
    assert got["diff"] == 0.0, f"resumed training differs by {got['diff']:.3g}"
    straight, resumed = got["losses"]
    assert straight == resumed
    assert got["client"] == {"epoch": 7}
    assert got["reshard_diff"] == 0.0, "loaded without pp, the model differs from the one saved at pp 2"
