"""The cost model's terms (compiler/cost.py): what separates candidates at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from zeroplan.compiler.comm import comm_volume, summarize
from zeroplan.compiler.cost import step_time
from zeroplan.schemas import CLUSTER_PRESETS, ClusterSpec, ConfigError, ModelSpec

BASE = {"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def _plan(compile_dict, *, stage, micro, cluster="cpu", **zero):
    return compile_dict({**BASE, "train_micro_batch_size_per_gpu": micro,
                         "zero_optimization": {"stage": stage, **zero}}, cluster=cluster, nproc_per_node=2)


def _with_rates(cluster: str, **rates) -> ClusterSpec:
    spec = CLUSTER_PRESETS[cluster]
    return spec.model_copy(update={"rates": spec.rates.model_copy(update=rates)})


def test_more_micro_steps_cost_more_at_the_same_global_batch(compile_dict, tiny):
    for stage in range(4):
        few, many = (step_time(_plan(compile_dict, stage=stage, micro=m), tiny, CLUSTER_PRESETS["cpu"])
                     for m in (8, 1))
        assert few["compute"] == pytest.approx(many["compute"])  # same samples, same FLOPs
        for term in ("micro_step_overhead", "layer_overhead"):
            assert many[term] == pytest.approx(8 * few[term])
        assert sum(many.values()) > sum(few.values())


def test_framework_overhead_is_per_micro_step_and_per_block(compile_dict, tiny):
    plan = _plan(compile_dict, stage=0, micro=2)  # accumulation 4
    cluster = _with_rates("cpu", micro_step_overhead=0.01, layer_overhead=0.002)
    terms = step_time(plan, tiny, cluster)
    assert terms["micro_step_overhead"] == pytest.approx(4 * 0.01)
    assert terms["layer_overhead"] == pytest.approx(4 * tiny.layers * 0.002)


def test_each_kind_of_collective_runs_at_its_own_bandwidth(compile_dict, tiny):
    slow_gathers = _with_rates("cpu", intra_node_collective_bandwidth={"all_gather": 1e7, "reduce_scatter": 1e7})
    fast = _with_rates("cpu", intra_node_collective_bandwidth={})
    stage0, stage1 = (_plan(compile_dict, stage=s, micro=8) for s in (0, 1))
    assert step_time(stage0, tiny, slow_gathers)["dp_comm"] == pytest.approx(step_time(stage0, tiny, fast)["dp_comm"])
    assert step_time(stage1, tiny, slow_gathers)["dp_comm"] > 10 * step_time(stage1, tiny, fast)["dp_comm"]


def test_nothing_overlaps_on_cpu_ranks(compile_dict, tiny):
    """gloo's collectives run on the cores the rank computes on; on GPUs overlap_comm hides them."""
    for cluster, same in (("cpu", True), ("h100-80", False)):
        on, off = (step_time(_plan(compile_dict, stage=2, micro=1, cluster=cluster, overlap_comm=flag), tiny,
                             CLUSTER_PRESETS[cluster])["dp_comm"] for flag in (True, False))
        assert (on == pytest.approx(off)) is same


TINY_MODULES = 2 + ModelSpec.load("tiny").layers * 6 + 2
"""Modules owning parameters of the tiny GPT: wte, wpe; ln1 qkv proj ln2 fc out per block; ln_f, the tied lm_head."""


def test_stage3_gathers_once_per_module_forward_and_backward(compile_dict, tiny):
    plan = _plan(compile_dict, stage=3, micro=4, stage3_param_persistence_threshold=1)  # accumulation 2
    collectives = comm_volume(plan, tiny)
    _, calls = summarize(collectives)
    modules = TINY_MODULES
    assert sum(c.calls for c in collectives if c.key == "dp.all_gather" and c.phase == "forward") == 2 * modules
    # Two micro-batches: every module in forward, all but the two embeddings in backward.
    assert calls["dp.all_gather"] == 2 * modules + 2 * (modules - 2)


def test_stage3_gather_count_matches_the_runtime(compile_dict, tiny, tmp_path):
    """The runtime's logged all-gathers of a micro-step, against the model's 2 x modules: backward does
    not regather the two embeddings (their backward needs only the indices)."""
    code = textwrap.dedent("""
        import json, sys, torch
        from zeroplan.runtime import initialize
        from zeroplan.runtime.models import GPT, MarkovChainData
        from zeroplan.schemas import ModelSpec, Plan
        spec = ModelSpec.load("tiny")
        engine = initialize(GPT(spec), plan=Plan.load(sys.argv[1]))
        data = MarkovChainData(vocab=spec.vocab, seq_len=spec.seq_len).iterate(
            global_batch_size=4, micro_batch_size=2, dp=1, dp_rank=0)
        engine.train_batch(data)
        print(json.dumps(engine.last_comms))
        engine.close()
    """)
    plan = compile_dict({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
                         "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1}},
                        nproc_per_node=1)
    path = plan.save(tmp_path / "plan.json")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    logged = json.loads(run.stdout.strip().splitlines()[-1])["all_gather_into_tensor"]["count"]
    per_step = 2 * 2 * TINY_MODULES  # two micro-steps
    assert per_step - 2 * 2 <= logged <= per_step + 4  # + the step's gathers of persistent (none here) params


def test_a_cluster_file_without_the_new_rates_still_loads(tmp_path):
    data = json.loads(CLUSTER_PRESETS["cpu"].to_json())
    for key in ("intra_node_collective_bandwidth", "micro_step_overhead", "layer_overhead"):
        del data["rates"][key]
    (tmp_path / "old.json").write_text(json.dumps(data))
    rates = ClusterSpec.load(tmp_path / "old.json").rates
    assert rates.layer_overhead == 0 and rates.collective_bandwidth("all_gather", inter_node=False) == rates.intra_node_bandwidth


def test_a_bad_collective_bandwidth_names_the_file(tmp_path):
    data = json.loads(CLUSTER_PRESETS["cpu"].to_json())
    data["rates"]["intra_node_collective_bandwidth"] = {"all_gather": 0}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="bad.json"):
        ClusterSpec.load(tmp_path / "bad.json")


def test_probe_fit_reads_latency_from_the_small_message():
    from zeroplan.runtime.probe import _fit

    sizes = [1 << 20, 8 << 20]
    sent = [s / 2 for s in sizes]  # all-gather over 2 ranks
    seconds = [1e-4, *(1e-4 + x / 5e8 for x in sent)]
    bandwidth, latency = _fit(sizes, seconds, op="all_gather", world=2)
    assert latency == pytest.approx(1e-4) and bandwidth == pytest.approx(5e8)


def test_probe_measures_framework_overheads():
    from zeroplan.runtime.probe import framework_overheads

    per_micro_step, per_block = framework_overheads(device="cpu")
    assert per_block > 0 and per_micro_step >= 0 and per_block < 1.0


def test_gradient_traffic_follows_the_path_the_runtime_takes(compile_dict, tiny):
    """Stage 1 with one micro-batch per step runs stage 2's gradient path (Stage1Direct), and
    stage 0 in fp32 rewrites no parameters after the step (they are the master's views)."""
    from zeroplan.compiler.cost import gradient_bytes
    from zeroplan.compiler.shapes import stage_shapes

    def traffic(stage, micro, dtype=None):
        data = {**BASE, "train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": stage}}
        if dtype:
            data[dtype] = {"enabled": True}
        plan = compile_dict(data, nproc_per_node=2)
        return gradient_bytes(plan, stage_shapes(tiny, tp=1, pp=1)[0]), plan.batch.gradient_accumulation_steps

    (one_1, accum_1), (one_2, _) = traffic(1, 8), traffic(2, 8)
    assert accum_1 == 1 and one_1 == one_2
    (many_1, accum_many), (many_2, _) = traffic(1, 1), traffic(2, 1)
    assert accum_many == 8 and many_1 != many_2
    psi = stage_shapes(tiny, tp=1, pp=1)[0].params
    fp32_0, accum = traffic(0, 8)
    assert fp32_0 == accum * psi * 16 + psi * 8  # per micro-step and the in-place average; no publish
    bf16_0, _ = traffic(0, 8, "bf16")
    assert bf16_0 > fp32_0
