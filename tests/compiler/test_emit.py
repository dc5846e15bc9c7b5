"""Emitted files: plan.json, launch.sh, launch.sbatch, report.md, ds_config.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings

import pytest

from zeroplan.compiler import compile
from zeroplan.compiler.emit import emit
from zeroplan.schemas import ClusterSpec, ConfigWarning, ModelSpec, Plan, load_config

CASES = {
    "zero2-fp32": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                   "zero_optimization": {"stage": 2, "overlap_comm": True},
                   "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
                   "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100}}},
    "zero3-bf16-offload": {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                 "offload_param": {"device": "cpu"}}},
    "zero1-fp16-sgd": {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True, "loss_scale": 128},
                       "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
                       "zero_optimization": {"stage": 1}},
    "zero2-lamb": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                   "optimizer": {"type": "Lamb", "params": {"lr": 2e-3, "bias_correction": False, "max_coeff": 4}}},
    "zero3-lion-sub-group-0": {"train_micro_batch_size_per_gpu": 1,
                               "zero_optimization": {"stage": 3, "sub_group_size": 0, "max_live_parameters": 5000},
                               "optimizer": {"type": "Lion", "params": {"betas": [0.95, 0.98]}}},
    "zero1-adagrad": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                      "optimizer": {"type": "Adagrad", "params": {"eps": 1e-9}}},
}


def _emit(tmp_path, data, *, cluster="cpu", nnodes=None, nproc=2):
    config = load_config(data)
    model, machines = ModelSpec.load("tiny"), ClusterSpec.load(cluster).with_shape(nnodes=nnodes, nproc_per_node=nproc)
    plan = compile(config, model, machines)
    emit(plan, config=config, model=model, cluster=machines, out=tmp_path, source="case.json")
    return plan


@pytest.mark.parametrize("name", sorted(CASES))
def test_ds_config_validates_and_recompiles_to_the_same_plan(tmp_path, name):
    plan = _emit(tmp_path, CASES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        again = load_config(tmp_path / "ds_config.json", world_size=plan.world.world_size)
    replan = compile(again, ModelSpec.load("tiny"), ClusterSpec.load("cpu"), nproc_per_node=2)
    for section in ("batch", "zero", "offload", "precision", "optimizer", "scheduler", "kernels"):
        ours, theirs = getattr(plan, section), getattr(replan, section)
        if section == "batch":  # which keys were derived differs: ds_config gives all three
            ours, theirs = ours.model_copy(update={"derived": ()}), theirs.model_copy(update={"derived": ()})
        assert ours == theirs, section


def test_every_file_is_written_and_plan_json_loads(tmp_path):
    plan = _emit(tmp_path, CASES["zero2-fp32"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ds_config.json", "launch.sbatch", "launch.sh", "plan.json", "report.md"]  # no temp files left
    assert Plan.load(tmp_path / "plan.json") == plan
    report = (tmp_path / "report.md").read_text()
    assert "| activations |" in report and "## Predicted step time" in report and "dp.reduce_scatter" in report


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("nnodes", [1, 3])
def test_launch_scripts_pass_bash_syntax_check(tmp_path, nnodes):
    data = {k: v for k, v in CASES["zero3-bf16-offload"].items() if k != "train_batch_size"}
    _emit(tmp_path, data, cluster="h100-80", nnodes=nnodes, nproc=8)
    for name in ("launch.sh", "launch.sbatch"):
        subprocess.run(["bash", "-n", str(tmp_path / name)], check=True)
    launch = (tmp_path / "launch.sh").read_text()
    assert ("MASTER_ADDR" in launch) == (nnodes > 1)
    assert "exec zeroplan train \"$PLAN\" --model tiny \"$@\"" in launch
    assert "torchrun " not in launch, "zeroplan train starts the node's ranks itself: no launcher around it"
    assert f"#SBATCH --nodes={nnodes}" in (tmp_path / "launch.sbatch").read_text()


def test_report_warns_when_the_plan_does_not_fit(tmp_path):
    config = load_config({"train_micro_batch_size_per_gpu": 1})
    model, cluster = ModelSpec.load("70b"), ClusterSpec.load("a100-40")
    emit(compile(config, model, cluster), config=config, model=model, cluster=cluster, out=tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "**does not fit**" in report and "- does not fit:" in report
    assert json.loads((tmp_path / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
