"""`zeroplan train` end to end: torchrun with the plan's process count, metrics as JSON lines,
and a user script that picks the plan up from the environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from rt_plans import make_plan
from zeroplan.schemas.steps import StepRecord, SummaryRecord, read_records

ZEROPLAN = [sys.executable, "-m", "zeroplan"]


def test_train_builtin_model_writes_metrics(tmp_path):
    plan = make_plan(stage=3, world=2, micro=4, reduce_bucket=10**6, allgather_bucket=10**6, persistence=1000)
    plan.save(tmp_path / "plan.json")
    metrics = tmp_path / "m.jsonl"
    run = subprocess.run([*ZEROPLAN, "train", str(tmp_path / "plan.json"), "--model", "tiny", "--steps", "4",
                          "--metrics", str(metrics)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    *steps, summary = read_records(metrics)
    assert all(isinstance(s, StepRecord) for s in steps) and isinstance(summary, SummaryRecord)
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert all(s.step_time_s > 0 and s.samples_per_s > 0 for s in steps)
    assert summary.world_size == 2 and summary.stage == 3
    assert len(summary.peak_rss_bytes_per_rank) == 2
    assert summary.comms_per_step["reduce_scatter_tensor"].count >= 1
    assert "step 4/4" in run.stdout


def test_train_runs_a_user_script_with_the_plan_from_the_environment(tmp_path):
    make_plan(stage=2, world=2, micro=2, scheduler=None).save(tmp_path / "plan.json")
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        import zeroplan
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        engine = zeroplan.initialize(model)
        for step in range(2):
            x = torch.randn(2, 5)
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()
        full = engine.full_state_dict()
        with open(sys.argv[1] + f".{dist.get_rank()}", "w") as f:
            f.write(f"{dist.get_world_size()} {engine.global_steps} {float(full['0.weight'].sum()):.6f}")
        engine.close()
    """))
    out = tmp_path / "out"
    run = subprocess.run([*ZEROPLAN, "train", str(tmp_path / "plan.json"), "--", str(script), str(out)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [Path(f"{out}.{r}").read_text().split() for r in range(2)]
    assert ranks[0][:2] == ["2", "2"] and ranks[0] == ranks[1]


def test_train_reports_a_missing_plan(tmp_path):
    run = subprocess.run([*ZEROPLAN, "train", str(tmp_path / "nope.json")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "zeroplan compile" in run.stderr
