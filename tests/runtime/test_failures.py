"""Nothing lost, nothing escapes, nothing hangs: `zeroplan train` with real ranks that get
stuck, go non-finite, crash or are killed (rt_faults.py injects the fault).

- a rank stuck outside a collective ends the job within the plan's collective timeout, and
  the error names the rank that did not come;
- a nan micro-batch on one rank stops the run at that step (exit 1, the step named), or is
  skipped with `precision.nonfinite: skip`;
- SIGSEGV, SIGKILL and an out-of-memory error of a rank are reported as such, from the rank;
- kill -9 of `zeroplan train` leaves no process of the run and no swap directory;
- SIGTERM of `zeroplan autotune` stops the running trial and marks it failed, kill -9 of it
  ends the trial too, and the resumed study fails the trial the killed tuner left running;
- a swap directory whose owner died is removed by the next run and by `zeroplan clean`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import optuna

from rt_plans import make_plan
from rt_processes import MARK, kill_survivors, processes_with, wait_until
from zeroplan.autotune.study import fail_orphaned_trials
from zeroplan.cli import app
from zeroplan.runtime import initialize
from zeroplan.runtime.offload.swap import SwapDir
from zeroplan.runtime.precision import NonFiniteError
from zeroplan.runtime.rundir import OWNER_FILE, make_private_dir
from zeroplan.schemas.plan import OffloadPlan, OffloadTarget
from zeroplan.schemas.steps import FailureRecord, MetricsRecord, StepRecord, read_records

FAULTS = f"{Path(__file__).parent / 'rt_faults.py'}:build"


def _train(tmp_path: Path, *, fault: str, world: int = 2, steps: int = 4, timeout_s: float = 600.0,
           offload: OffloadPlan | None = None, wait: bool = True):
    """`zeroplan train` of the fault model; every process of the run carries $ZP_TEST_RUN."""
    plan = make_plan(stage=1, world=world, micro=2, scheduler=None, offload=offload, timeout_s=timeout_s)
    plan.save(tmp_path / "plan.json")
    mark = uuid.uuid4().hex
    argv = [sys.executable, "-m", "zeroplan", "train", str(tmp_path / "plan.json"), "--model", FAULTS,
            "--steps", str(steps), "--metrics", str(tmp_path / "m.jsonl")]
    env = {**os.environ, "ZP_FAULT": fault, MARK: mark}
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), mark
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300), mark


def _metrics(tmp_path: Path) -> list[MetricsRecord]:
    return read_records(tmp_path / "m.jsonl")


def test_a_stuck_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    run, _ = _train(tmp_path, fault="hang:1:1", timeout_s=5)
    ended = time.time()
    assert run.returncode == 1, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: rank 0: ") and "timed out after 5 s (failures.collective_timeout_s)" in error
    assert "rank(s) 1 did not join it (rank 1 was at " in error and "rt_faults.py" in error, error
    step1 = (tmp_path / "m.jsonl").stat().st_mtime  # rank 0 wrote step 1, then waited in step 2
    assert ended - step1 < 5 + 25, f"the job ended {ended - step1:.0f} s after its last step"


def test_a_nan_micro_batch_on_one_rank_stops_the_run_naming_the_step(tmp_path):
    run, _ = _train(tmp_path, fault="nan:1:2")
    assert run.returncode == 1, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: rank 1: the gradient norm is nan at step 3; this rank's own loss was nan"), error
    assert "Traceback" not in run.stderr
    lines = _metrics(tmp_path)
    assert [x.step for x in lines if isinstance(x, StepRecord)] == [1, 2]
    assert isinstance(lines[-1], FailureRecord) and lines[-1].kind == "nonfinite" and lines[-1].rank == 1


@pytest.mark.parametrize("fault, world, cause", [
    ("kill:1:1", 2, "error: rank 1: killed by SIGKILL (kill -9, or the kernel's out-of-memory killer)"),
    ("segv:0:1", 1, "error: rank 0: killed by SIGSEGV (Segmentation fault) at "),
    ("oom:0:1", 1, "error: rank 0: out of memory: RuntimeError: "),
])
def test_a_dead_rank_is_named_with_its_cause(tmp_path, fault, world, cause):
    run, _ = _train(tmp_path, fault=fault, world=world)
    assert run.returncode == 1, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith(cause), error
    if fault.startswith(("segv", "oom")):
        assert "rt_faults.py" in error and "in _inject" in error, error
    assert _metrics(tmp_path)[-1].cause == error.removeprefix("error: ")


def test_kill_9_of_zeroplan_train_leaves_no_process_and_no_swap_directory(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    proc, mark = _train(tmp_path, fault="slow:-1:-1", steps=1000, wait=False,
                        offload=OffloadPlan(optimizer=OffloadTarget(device="nvme", nvme_path=str(nvme))))
    try:
        assert wait_until(lambda: _metrics(tmp_path) or proc.poll() is not None, 240), "no step was reported"
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert len(processes_with(mark)) >= 4  # zeroplan train, the agent, two ranks
        assert len(list(nvme.iterdir())) == 2  # one swap directory per rank
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not processes_with(mark), 20), f"survivors: {processes_with(mark)}"
        assert list(nvme.iterdir()) == []
    finally:
        kill_survivors(mark)


def _autotune(tmp_path: Path, mark: str) -> subprocess.Popen:
    """`zeroplan autotune` whose trials run for minutes (one rank each: the agent's part of the
    chain is the kill -9 test of `zeroplan train` above)."""
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": "auto"},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "autotuning": {"measured_steps": 100, "study_name": "hygiene"}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    argv = [sys.executable, "-m", "zeroplan", "autotune", str(tmp_path / "c.json"), "--model", FAULTS,
            "--model-spec", "tiny", "--cluster", "cpu", "--nproc-per-node", "1", "--max-trials", "3",
            "--sampler", "random", "--out", str(tmp_path / "out")]
    return subprocess.Popen(argv, env={**os.environ, "ZP_FAULT": "slow:-1:-1", MARK: mark}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _trial_running(tmp_path: Path, number: int, tuner: subprocess.Popen) -> None:
    metrics = tmp_path / "out" / "trials" / "hygiene" / f"trial-{number:04d}" / "metrics.jsonl"  # trials/<study>/
    started = wait_until(lambda: tuner.poll() is not None or (metrics.exists() and metrics.read_text()), 240)
    assert started and tuner.poll() is None, tuner.communicate()[1][-3000:] if tuner.poll() is not None else "no step"


def test_sigterm_and_kill_9_of_zeroplan_autotune_end_the_running_trial(tmp_path):
    mark = uuid.uuid4().hex
    try:
        tuner = _autotune(tmp_path, mark)
        _trial_running(tmp_path, 0, tuner)
        tuner.send_signal(signal.SIGTERM)
        _, err = tuner.communicate(timeout=60)
        assert tuner.returncode == 128 + signal.SIGTERM and "run the same command to resume" in err, err[-3000:]
        assert wait_until(lambda: not processes_with(mark), 20), f"survivors: {processes_with(mark)}"

        tuner = _autotune(tmp_path, mark)  # resumes the study
        _trial_running(tmp_path, 1, tuner)
        tuner.kill()
        tuner.wait()
        assert wait_until(lambda: not processes_with(mark), 20), f"survivors: {processes_with(mark)}"
        study = optuna.load_study(study_name="hygiene", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
        assert [t.state.name for t in study.trials[:2]] == ["FAIL", "RUNNING"]  # then warm-start trials waiting
        assert fail_orphaned_trials(study) == [1]
        trial = study.trials[1]
        assert trial.state.name == "FAIL" and "its tuner (pid" in trial.user_attrs["reason"]
    finally:
        kill_survivors(mark)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_swap_directories_of_dead_runs_are_removed_by_the_next_run_and_by_clean(tmp_path):
    def abandoned() -> Path:
        path = make_private_dir(tmp_path, kind="optimizer")
        owner = json.loads((path / OWNER_FILE).read_text())
        (path / OWNER_FILE).write_text(json.dumps({**owner, "pid": _dead_pid()}))
        (path / "rank0.swp").write_bytes(b"x" * 4096)
        return path

    first = abandoned()
    live = SwapDir(root=tmp_path, label="optimizer")  # a new run sweeps its nvme_path first
    assert not first.exists() and live.path.exists()
    second = abandoned()
    result = CliRunner().invoke(app, ["clean", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"removed {second}" in result.output and not second.exists()
    assert live.path.exists(), "a live run's directory was removed"
    live.close()


def _step(engine, x: torch.Tensor) -> None:
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


@pytest.mark.parametrize("dtype, policy", [("fp32", "stop"), ("bf16", "skip")])
def test_a_nonfinite_step_stops_or_is_skipped(dtype, policy):
    torch.manual_seed(0)
    engine = initialize(torch.nn.Linear(4, 1), plan=make_plan(stage=0, world=1, dtype=dtype, scheduler=None,
                                                             nonfinite=policy))
    try:
        _step(engine, torch.ones(2, 4))
        bad = torch.ones(2, 4)
        bad[0, 0] = float("nan")
        if policy == "stop":
            with pytest.raises(NonFiniteError, match="the gradient norm is nan at step 2"):
                _step(engine, bad)
            return
        _step(engine, bad)
        _step(engine, torch.ones(2, 4))
        assert engine.skipped_steps == 1 and engine.global_steps == 3
        assert all(torch.isfinite(p).all() for p in engine.module.parameters())
        assert engine.last_loss is not None and engine.last_loss == engine.last_loss
    finally:
        engine.close()
