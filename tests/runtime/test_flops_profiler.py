"""The FLOPs profiler (runtime/flops.py) counts what a step runs and changes nothing: on 2 ranks
with ZeRO-2, 2 micro-batches and activation checkpointing, each rank's count of the profiled
step equals the compiler's analytic figure (compiler/flops.py) phase by phase, recompute
included, exactly; the run's parameters and losses equal those of the same run unprofiled, bit
for bit; rank 0 alone writes the report, atomically."""

from __future__ import annotations

import pytest
import torch

from rt_cases import GLOBAL_BATCH, SPEC
from rt_flops import CASE, PROFILE_STEP
from rt_spawn import job_result, spawn_jobs
from zeroplan.compiler.flops import StepFlops, step_flops

BUILT_IN = SPEC.model_copy(update={"attention": "flash"})
"""The test model as the built-in GPT runs it: F.scaled_dot_product_attention's fused kernel."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flops")
    results = spawn_jobs(2, [("profiled", "rt_flops:train", {"output_file": str(root / "flops.txt")}),
                             ("plain", "rt_flops:train", {"output_file": None})])
    return {"root": root, **{job: job_result(results, job) for job in ("profiled", "plain")}}


def test_every_rank_counts_the_analytic_flops(runs):
    micro = GLOBAL_BATCH // (CASE["world"] * CASE["accum"])
    expected = step_flops(BUILT_IN, tokens=micro * CASE["accum"] * SPEC.seq_len, layers=SPEC.layers, head=True,
                          recompute=True)
    assert expected.recompute > 0 and expected.backward > 2 * expected.forward  # fused attention: 2.5x
    assert [StepFlops(**c) for c in runs["profiled"]["counted"]] == [expected, expected]


def test_the_profiled_run_trains_the_same_parameters(runs):
    profiled, plain = runs["profiled"], runs["plain"]
    assert profiled["losses"] == plain["losses"]
    assert profiled["params"].keys() == plain["params"].keys()
    for name, value in plain["params"].items():
        assert torch.equal(profiled["params"][name], value), name


def test_rank_zero_writes_the_report_atomically(runs):
    assert runs["profiled"]["files"] == ["flops.txt"]  # no temp file left, one writer
    report = (runs["root"] / "flops.txt").read_text()
    assert f"Profile of step {PROFILE_STEP} on rank 0 of 2" in report
    assert "counted as activation checkpointing ran it" in report
    assert "(3 + recompute_fwd_factor 1) x forward" in report and "HFU" in report
    assert "depth 3: " in report and "depth 4: " not in report  # module_depth 3
    assert "      attn (Attention)" in report and "qkv (Linear)" not in report
