"""The DeepSpeed side of the benchmarks without DeepSpeed installed: the ds_config the adapter
hands it (zeroplan's emitter) uses only keys DeepSpeed 0.19 accepts, and the autotuner
benchmark asks DeepSpeed for exactly zeroplan's tuning space and reads its result folders.
Where deepspeed is importable, its own config models validate the emitted sections too."""

from __future__ import annotations

import json
import os

import pytest

from bench import deepspeed_autotune
from bench.autotune_efficiency import grid_config
from bench.systems import SYSTEMS
from bench.workload import Workload, compile_plan
from zeroplan.compiler.deepspeed import ds_config

OFFLOAD_OPTIMIZER_KEYS = {"device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write",
                          "fast_init", "ratio", "super_offload", "cpuadam_cores_perc"}
"""DeepSpeedZeroOffloadOptimizerConfig's fields (deepspeed 0.19, runtime/zero/offload_config.py);
the model forbids any other key."""


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_optimizer_section_has_only_deepspeed_keys(stage):
    config = ds_config(compile_plan(Workload(preset="tiny"), stage=stage, offload="cpu"))
    section = config["zero_optimization"]["offload_optimizer"]
    assert section["device"] == "cpu"
    assert set(section) <= OFFLOAD_OPTIMIZER_KEYS, set(section) - OFFLOAD_OPTIMIZER_KEYS


def test_deepspeed_validates_the_emitted_zero_section():
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage, offload in [(0, "none"), (2, "none"), (2, "cpu"), (3, "cpu")]:
        zero = ds_config(compile_plan(Workload(preset="tiny"), stage=stage, offload=offload))["zero_optimization"]
        assert DeepSpeedZeroConfig(**zero).stage == stage


def test_every_deepspeed_system_has_a_zeroplan_twin_with_the_same_plan():
    ds = [name for name in SYSTEMS if name.startswith("deepspeed-")]
    assert ds == ["deepspeed-z0", "deepspeed-z1", "deepspeed-z2", "deepspeed-z3", "deepspeed-z1-offload-cpu",
                  "deepspeed-z2-offload-cpu", "deepspeed-z3-offload-cpu"]
    for name in ds:
        twin = SYSTEMS[name.replace("deepspeed", "zeroplan")]
        assert (twin.stage, twin.offload) == (SYSTEMS[name].stage, SYSTEMS[name].offload)


def test_autotuner_space_is_zeroplans_grid(tmp_path):
    ours = grid_config(global_batch=8)["autotuning"]["space"]
    theirs = deepspeed_autotune.autotune_config(out=tmp_path)
    assert theirs["zero_optimization"]["stage"] == ours["zero_optimization.stage"]["choices"]
    assert theirs["train_micro_batch_size_per_gpu"] == ours["train_micro_batch_size_per_gpu"]["choices"]
    # accumulation = max(micro) / micro keeps the global batch at 2 ranks x 4 = 8, as the grid's
    assert theirs["gradient_accumulation_steps"] == 1 and max(theirs["train_micro_batch_size_per_gpu"]) * 2 == 8
    assert theirs["autotuning"]["fast"] is True


def test_experiments_are_read_from_deepspeeds_result_folders(tmp_path):
    """The folder layout DeepSpeed's scheduler writes: results/<exp>/exp.json and metrics.json."""
    for name, stage, micro, metric in [("z0_gas4_tmbspg1", 0, 1, 2.5), ("z3_gas1_tmbspg4", 3, 4, None)]:
        d = tmp_path / "results" / name
        d.mkdir(parents=True)
        (d / "exp.json").write_text(json.dumps({"name": name, "ds_config": {
            "zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 4 // micro}}))
        if metric is None:
            (d / "stderr.log").write_text("Traceback ...\nRuntimeError: out of memory\n")
        else:
            (d / "metrics.json").write_text(json.dumps({"throughput": metric, "latency": 1.0}))
    rows = deepspeed_autotune.experiments(tmp_path)
    assert [(r["stage"], r["micro"], r["accumulation"], r["samples_per_s"]) for r in rows] == [
        (0, 1, 4, 2.5), (3, 4, 1, None)]
    assert rows[1]["error"] == "RuntimeError: out of memory" and rows[0]["error"] is None


def test_deepspeeds_summary_wins_over_a_metrics_file_the_final_run_rewrote(tmp_path):
    """`--autotuning run` retrains with the optimal config, whose metric_path is the optimal
    experiment's metrics.json: the tuning value survives only in results/summary.txt."""
    d = tmp_path / "results" / "z2_gas1_tmbspg4"
    d.mkdir(parents=True)
    (d / "exp.json").write_text(json.dumps({"name": d.name, "ds_config": {
        "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}}))
    (d / "metrics.json").write_text(json.dumps({"throughput": 0.74}))  # the final run's figure
    (tmp_path / "results" / "summary.txt").write_text(
        "| tuning_space   |   num_experiments |   best_metric_val | best_exp_name   |\n"
        "|:---------------|------------------:|------------------:|:----------------|\n"
        "| z2             |                 3 |          1.24957  | z2_gas1_tmbspg4 |\n"
        "| global         |                12 |          1.24957  | z2_gas1_tmbspg4 |\n")
    (row,) = deepspeed_autotune.experiments(tmp_path)
    assert row["samples_per_s"] == 1.24957
