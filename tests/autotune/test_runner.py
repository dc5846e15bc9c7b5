"""The trial runner with real child processes: success, pruning, crash, hang, NaN, OOM."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from zeroplan.autotune.runner import run_trial

CHILD = textwrap.dedent('''
    import json, os, subprocess, sys, time
    mode = sys.argv[1]
    out = open(os.environ["ZEROPLAN_METRICS"], "a")
    def step(i, loss=1.0):
        out.write(json.dumps({"step": i, "step_time_s": 0.01 * (i + 1), "loss": loss,
                              "samples_per_s": 100.0, "peak_memory_bytes": 1000 + i}) + "\\n")
        out.flush()
    if mode == "hang":
        # a grandchild in the same process group, as torchrun's workers are
        kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open("grandchild.pid", "w").write(str(kid.pid))
    for i in range(5):
        if mode == "nan" and i == 2:
            step(i, float("nan"))
            time.sleep(600)
        step(i)
        if mode == "crash" and i == 1:
            raise RuntimeError("injected failure in step 1")
        if mode == "oom" and i == 1:
            print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
            sys.exit(1)
        if mode in ("hang", "slow"):
            time.sleep(600 if mode == "hang" else 0.3)
''')


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return lambda mode: [sys.executable, str(script), mode]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_complete_trial_reports_every_step(child, tmp_path):
    seen = []
    outcome = run_trial(command=child("ok"), workdir=tmp_path / "t", timeout_s=60,
                        on_step=lambda r: seen.append(r.step) or False)
    assert outcome.state == "complete", outcome
    assert seen == [0, 1, 2, 3, 4]
    assert [s.peak_memory_bytes for s in outcome.steps] == [1000, 1001, 1002, 1003, 1004]


def test_pruning_stops_the_child(child, tmp_path):
    start = time.monotonic()
    outcome = run_trial(command=child("slow"), workdir=tmp_path / "t", timeout_s=60,
                        on_step=lambda r: r.step >= 1)
    assert outcome.state == "pruned" and outcome.reason == "pruned after step 1"
    assert time.monotonic() - start < 10


def test_crash_is_recorded_with_reason_and_log(child, tmp_path):
    outcome = run_trial(command=child("crash"), workdir=tmp_path / "t", timeout_s=60)
    assert outcome.state == "failed" and outcome.reason == "crashed (exit 1)"
    assert "injected failure in step 1" in outcome.log_tail
    assert len(outcome.steps) == 2


def test_hang_past_timeout_kills_the_whole_process_group(child, tmp_path):
    outcome = run_trial(command=child("hang"), workdir=tmp_path / "t", timeout_s=3)
    assert outcome.state == "failed" and outcome.reason.startswith("timed out after 3 s (1 step(s) reported)")
    grandchild = int((tmp_path / "t" / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "a worker of the trial survived it"


def test_nan_loss_fails_the_trial_at_once(child, tmp_path):
    outcome = run_trial(command=child("nan"), workdir=tmp_path / "t", timeout_s=60)
    assert outcome.state == "failed" and outcome.reason == "loss is nan at step 2"
    assert outcome.wall_s < 30


def test_out_of_memory_is_named(child, tmp_path):
    outcome = run_trial(command=child("oom"), workdir=tmp_path / "t", timeout_s=60)
    assert outcome.state == "failed" and outcome.reason.startswith("out of memory")


def test_silent_success_is_a_failure(tmp_path):
    outcome = run_trial(command=[sys.executable, "-c", "pass"], workdir=tmp_path / "t", timeout_s=30)
    assert outcome.state == "failed" and outcome.reason == "finished without reporting a step"
