"""End to end: `zeroplan autotune` on the tiny GPT at 2 processes (the cluster probed first, as
`--cluster auto` does), then `zeroplan train` on the best plan it wrote. Real compile, a real
probe, real torchrun trials, a real SQLite study."""

from __future__ import annotations

import subprocess
import sys

import yaml

from zeroplan.schemas import Plan
from zeroplan.schemas.steps import read_summary


def zeroplan(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroplan", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_autotune_tiny_then_train_the_best_plan(tmp_path):
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": "auto"},
        "autotuning": {"space": {"zero_optimization.stage": {"choices": [0, 3]}},
                       "warmup_steps": 1, "measured_steps": 2, "sampler": "grid", "max_trials": 2},
    }))
    run = zeroplan("autotune", str(config), "--model", "tiny", "--nproc-per-node", "2", "--out", "tuned",
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "best plan:" in run.stdout
    out = tmp_path / "tuned"
    # no --cluster: this machine is probed once and the candidates ranked with what was measured
    assert "measured now" in run.stdout and (out / "cluster.json").is_file()
    best = Plan.load(out / "best_plan.json")
    assert best.zero.stage in (0, 3) and best.world.world_size == 2
    assert best.provenance.trial_number in (0, 1) and best.provenance.measured_samples_per_s > 0
    for name in ("trials.csv", "report.md", "report.html", "study.db", "best/launch.sh", "best/plan.json",
                 "best/ds_config.json"):
        assert (out / name).is_file(), name
    assert Plan.load(out / "best" / "plan.json") == best

    metrics = tmp_path / "train.jsonl"
    run = zeroplan("train", str(out / "best_plan.json"), "--model", "tiny", "--steps", "3",
                   "--metrics", str(metrics), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = read_summary(metrics)
    assert summary.steps == 3 and summary.stage == best.zero.stage

    # `zeroplan report` re-renders from the stored study
    (out / "report.md").unlink()
    run = zeroplan("report", "tuned", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Autotuning report" in (out / "report.md").read_text()
