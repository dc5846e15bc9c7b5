"""Tuning your own model (`--model module:function`) and your own training script (`--script`),
end to end at 2 processes: real torchrun trials of examples/user_model.py and
examples/train_script.py, a real SQLite study. Plus the measured model shape and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zeroplan.schemas import ModelSpec, Plan
from zeroplan.schemas.steps import StepRecord, SummaryRecord, read_records, read_summary

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def zeroplan(*args: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroplan", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def _config(tmp_path: Path, *, stages: list[int], trials: int) -> Path:
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({
        "train_batch_size": 32, "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": "auto"},
        "autotuning": {"space": {"zero_optimization.stage": {"choices": stages}}, "warmup_steps": 1,
                       "measured_steps": 2, "sampler": "grid", "max_trials": trials}}))
    return config


def _steps(out: Path, trial: int) -> list[dict]:
    (metrics,) = (out / "trials").glob(f"*/trial-{trial:04d}/metrics.jsonl")  # trials/<study>/trial-NNNN
    return read_records(metrics)


def test_tune_a_model_function_then_train_its_best_plan(tmp_path):
    (tmp_path / "examples").symlink_to(EXAMPLES)  # a relative file path, as a user types it
    config = _config(tmp_path, stages=[0, 3], trials=2)
    run = zeroplan("autotune", str(config), "--model", "examples/user_model.py:build", "--cluster", "cpu",
                   "--out", "tuned", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "tuned"
    spec = ModelSpec.load(out / "model_spec.json")
    assert spec.layers == 4 and spec.seq_len == 1
    assert abs(spec.total_params - 533_386) < 0.01 * 533_386  # the module's own count (see examples/user_model.py)
    timing = json.loads((out / "model_timing.json").read_text())  # the overhead prior's one-step timing
    assert timing["model"] == "examples/user_model.py:build" and timing["micro_step_s"] > 0
    assert "overheads primed by one micro-step of the model" in run.stdout
    best = Plan.load(out / "best_plan.json")
    assert best.zero.stage in (0, 3) and best.provenance.measured_samples_per_s > 0
    assert [s.step for s in _steps(out, 0) if isinstance(s, StepRecord)] == [1, 2, 3]

    metrics = tmp_path / "train.jsonl"
    run = zeroplan("train", str(out / "best_plan.json"), "--model", "examples/user_model.py:build", "--steps", "2",
                   "--metrics", str(metrics), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = read_summary(metrics)
    assert summary.steps == 2 and len(summary.peak_rss_bytes_per_rank) == 2


def test_tune_a_training_script(tmp_path):
    """The script trains for 1000 steps unless told otherwise: the trial ends only because the engine
    stops it after the trial's steps ($ZEROPLAN_MAX_STEPS), having written the metrics ($ZEROPLAN_METRICS)."""
    config = _config(tmp_path, stages=[2], trials=1)
    run = zeroplan("autotune", str(config), "--script", str(EXAMPLES / "train_script.py"), "--cluster", "cpu",
                   "--out", "tuned", "--", "--steps", "1000", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "tuned"
    assert ModelSpec.load(out / "model_spec.json").name == "train_script.py"  # from the model-info run
    records = _steps(out, 0)
    assert [r.step for r in records if isinstance(r, StepRecord)] == [1, 2, 3]
    assert all(r.loss > 0 and r.step_time_s > 0 for r in records[:-1])
    assert isinstance(records[-1], SummaryRecord) and len(records[-1].peak_rss_bytes_per_rank) == 2
    assert Plan.load(out / "best_plan.json").zero.stage == 2


@pytest.mark.parametrize("module, source, message", [
    ("nosuch_module_xyz:build", "", "cannot import 'nosuch_module_xyz'"),
    ("bad_model:build", "def build():\n    return 42\n", "must return (nn.Module, get_batch), returned int"),
    ("bad_model:missing", "def build():\n    pass\n", "has no function 'missing'"),
])
def test_a_bad_model_function_is_a_clear_error(tmp_path, module, source, message):
    if source:
        (tmp_path / "bad_model.py").write_text(source)
    config = _config(tmp_path, stages=[0], trials=1)
    run = zeroplan("autotune", str(config), "--model", module, "--cluster", "cpu", "--out", "tuned", cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_script_arguments_need_a_script(tmp_path):
    run = zeroplan("autotune", str(_config(tmp_path, stages=[0], trials=1)), "--", "--steps", "3", cwd=tmp_path)
    assert run.returncode == 2 and "are for a --script" in run.stderr
