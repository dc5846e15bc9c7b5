"""Checkpoints, bucket counts, fp16 overflow handling and metrics on 2 gloo ranks (one spawn)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from rt_spawn import job_result, spawn_jobs
from zeroplan.runtime import checkpoint

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)

ROUNDTRIP = [dict(model="gpt", stage=s, world=2, accum=a, dtype=d) for s, a, d in
             ((0, 1, "fp32"), (1, 3, "fp32"), (2, 1, "bf16"), (3, 3, "fp32"), (2, 1, "fp16"))] + \
            [dict(model="zoo", stage=3, world=2, accum=1, persistence=10)]
BUCKETS = [(0, 10**9), (0, 3000), (0, 1), (2, 10**9), (2, 3000), (2, 1), (1, 3000), (3, 3000)]


@functools.lru_cache(maxsize=None)
def _results(root: str) -> dict:
    jobs = [(f"ckpt-{i}", "checkpoint_roundtrip", {"case": c, "directory": os.path.join(root, f"rt{i}")})
            for i, c in enumerate(ROUNDTRIP)]
    jobs.append(("crash", "interrupted_save", {"case": dict(model="gpt", stage=2, world=2, accum=1),
                                               "directory": os.path.join(root, "crash")}))
    jobs += [(f"buckets-{s}-{b}", "bucket_counts", {"stage": s, "bucket": b}) for s, b in BUCKETS]
    jobs += [(f"fp16-{s}", "fp16_overflow", {"stage": s}) for s in (0, 3)]
    jobs.append(("metrics", "metrics_after_training", {"stage": 2}))
    jobs.append(("collectives", "per_rank_collectives", {}))
    return spawn_jobs(2, jobs)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(str(tmp_path_factory.mktemp("ckpt")))


@pytest.mark.parametrize("i", range(len(ROUNDTRIP)),
                         ids=[f"{c['model']}-z{c['stage']}-a{c['accum']}-{c.get('dtype', 'fp32')}" for c in ROUNDTRIP])
def test_checkpoint_resume_equals_uninterrupted(results, i):
    got = job_result(results, f"ckpt-{i}")
    assert got["steps"] == 4
    assert got["diff"] == 0.0, f"resumed training differs by {got['diff']:.3g}"
    straight, resumed = got["losses"]
    assert straight == resumed
    assert got["client"]["epoch"] == 3 and got["client"]["note"] == "x"
    assert torch.equal(got["client"]["t"], torch.arange(3))
    assert got["rng_equal"], "the RNG state was not restored"


def test_interrupted_save_leaves_previous_checkpoint(results):
    got = job_result(results, "crash")
    assert got["crashed"]
    assert got["latest"] == "global_step2"
    assert got["steps"] == 2 and got["client"] == {"at": 2}
    assert got["diff"] == 0.0
    assert "global_step4" not in got["listing"], "a half-written checkpoint became visible"


def _expected_buckets(numels: list[int], bucket: int, world: int) -> int:
    count, size = 0, None
    for n in reversed(numels):
        padded = -(-n // world) * world
        if size is not None and size + padded <= bucket:
            size += padded
        else:
            count, size = count + 1, padded
    return count


@pytest.mark.parametrize("stage,bucket", BUCKETS, ids=[f"z{s}-{b}" for s, b in BUCKETS])
def test_collectives_follow_reduce_bucket_size(results, stage, bucket):
    got = job_result(results, f"buckets-{stage}-{bucket}")
    comms, numels = got["comms"], got["numels"]
    world, accum = 2, 2
    flags = 1  # at the step, one byte per tensor: which got a gradient on some rank
    if stage == 0:
        expected = _expected_buckets(numels, bucket, 1)
        assert comms["all_reduce"]["count"] == expected + flags, comms
    else:
        per_step = 1 if stage == 1 else accum
        expected = per_step * _expected_buckets(numels, bucket, world)
        assert comms["reduce_scatter_tensor"]["count"] == expected, comms
        assert comms["all_reduce"]["count"] == 1 + flags, "the global gradient norm's all-reduce and the flags'"
    if bucket >= 10**9:
        assert expected == (1 if stage == 0 else accum)
    if bucket == 1:
        assert expected == len(numels) * (1 if stage == 0 else accum)


@pytest.mark.parametrize("stage", (0, 3))
def test_fp16_overflow_skips_on_all_ranks(results, stage):
    log = job_result(results, f"fp16-{stage}")["log"]
    skipped = [e for e in log if e["skipped"]]
    taken = [e for e in log if not e["skipped"]]
    assert skipped and taken
    assert all(not e["moved"] for e in skipped), "a skipped step changed the weights"
    assert all(e["moved"] for e in taken)
    assert log[0]["skipped"] and log[0]["scale"] == 2.0 ** 20, "first overflow spends hysteresis only"
    assert log[1]["skipped"] and log[1]["scale"] == 2.0 ** 19
    assert log[10]["skipped"], "an overflow on rank 1 alone must skip the step on rank 0 too"


def test_metrics(results):
    m = job_result(results, "metrics")
    assert m["steps_timed"] == 3 and m["step_time_s"] > 0
    assert m["samples_per_s"] == pytest.approx(12 / m["step_time_s"])
    assert m["tokens_per_s"] == pytest.approx(12 * 8 / m["step_time_s"])
    assert m["peak_rss_bytes"] > 50 * 2**20
    assert m["comms"]["reduce_scatter_tensor"]["bytes"] > 0
    assert m["comms"]["all_gather_into_tensor"]["count"] > 0


def test_checkpoint_falls_back_to_old_copy(tmp_path):
    (tmp_path / ".global_step4.old").mkdir()
    (tmp_path / ".global_step4.old" / "meta.json").write_text("{}")
    (tmp_path / "latest").write_text("global_step4\n")
    assert checkpoint.resolve(tmp_path, None) == tmp_path / ".global_step4.old"
    with pytest.raises(checkpoint.CheckpointError, match="missing or incomplete"):
        checkpoint.resolve(tmp_path, "global_step9")


def test_gloo_collectives_per_rank_equal_torch_flat_forms(results):
    got = job_result(results, "collectives")
    assert got["per_rank"], "on gloo, reduce-scatter and all-gather should run per rank (runtime/comm.py)"
    assert got["untouched"], "reduce_scatter changed an input the caller did not mark scratch"
    assert got["rs_diff"] == 0.0, "a sum over two ranks does not depend on the order"
    assert got["rs_async_equal"] and got["ag_equal"]
    assert got["ag_in_place_equal"] == {True: True, False: True}, "the in-place all-gather (per rank, flat)"
    assert got["logged"] == {"all_gather_into_tensor": {"count": 1, "bytes": 2 * 333 * 4},
                             "reduce_scatter_tensor": {"count": 2, "bytes": 2 * 2 * 1001 * 4}}
