"""Several tuner workers on one study: three on a PostgreSQL server, one of them killed, and
three started in the same instant on one new SQLite file.

Each worker is its own process running `tune` on the stand-in trainer (conftest.py) for plans of
2 processes of the tiny preset, as `zeroplan autotune --storage URL` on several nodes would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from zeroplan.autotune.storage import open_storage
from zeroplan.schemas import ConfigError

from . import postgres

ROOT = Path(__file__).parents[2]
WORKER = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.autotune.conftest import FAKE_TRAINER, tiny_config
    from tests.autotune.test_tune import settings
    from zeroplan.autotune.tune import tune
    from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS
    out, storage, grid, start_at = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
    script = out / "fake.py"
    # Slow steps, and a trainer that stops once its tuner is gone (as `zeroplan train` does).
    script.write_text(FAKE_TRAINER.replace("plan = json.load", "PPID = os.getppid()\\nplan = json.load").replace(
        "    out.flush()\\n", "    out.flush()\\n    time.sleep(0.3)\\n    if os.getppid() != PPID:\\n        sys.exit(1)\\n"))
    while time.time() < start_at:  # every worker opens the storage in the same instant
        pass
    tune(data=tiny_config(autotuning={{"space": grid}}), model=MODEL_PRESETS["tiny"], cluster=CLUSTER_PRESETS["cpu"],
         settings=settings(out, storage=storage, max_trials=30, heartbeat_s=1),
         launcher=lambda p, n, m: [sys.executable, str(script), str(p), str(n), str(m)])
''')
GRID = {"zero_optimization.stage": {"choices": [0, 1, 2, 3]}, "train_micro_batch_size_per_gpu": {"choices": [2, 4]}}


def start_workers(n: int, *, out: Path, storage: str, grid: dict) -> list[subprocess.Popen]:
    """`n` workers that open `storage` together, a few seconds from now (after their imports)."""
    start_at = time.time() + 8
    script = WORKER.format(root=str(ROOT))
    return [subprocess.Popen([sys.executable, "-c", script, str(out), storage, json.dumps(grid), str(start_at)],
                             env={**os.environ, "FAKE_BEHAVIOUR": "{}"}, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(n)]


def finish(procs: list[subprocess.Popen], *, timeout_s: float = 240) -> list[str]:
    """Each worker's output, after checking it ended with status 0 (every worker killed on a timeout)."""
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, out[-3000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return outputs


def the_study(storage: str) -> optuna.Study:
    """The one study in `storage` (a plain postgresql:// URL reaches it through psycopg)."""
    rdb = open_storage(storage)
    summaries = optuna.get_all_study_summaries(storage=rdb)
    assert len(summaries) == 1, [s.study_name for s in summaries]
    return optuna.load_study(study_name=summaries[0].study_name, storage=rdb)


def kill_mid_trial(victim: subprocess.Popen, *, out: Path, storage: str, timeout_s: float = 120) -> None:
    """SIGKILL `victim` once a trial of its own has reported a measured step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            study = the_study(storage)
        except AssertionError:  # not created yet
            continue
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            metrics = out / "trials" / study.study_name / f"trial-{t.number:04d}" / "metrics.jsonl"
            if t.user_attrs.get("worker", {}).get("pid") == victim.pid and metrics.exists() and \
                    '"step": 2' in metrics.read_text():
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                return
    pytest.fail("the victim worker never ran a trial")


def runs(out: Path) -> dict[str, bool]:
    """Each trial folder that started the trainer -> whether the run finished (wrote its summary)."""
    return {p.parent.name: '"summary": true' in p.read_text() for p in (out / "trials").glob("*/trial-*/metrics.jsonl")}


@pytest.fixture(scope="module")
def pg_server():
    """A PostgreSQL server for this module's tests: its URL (each test makes its own database)."""
    if postgres.missing_reason() is not None and not os.environ.get("ZEROPLAN_REQUIRE_POSTGRES"):
        pytest.skip(str(postgres.missing_reason()))  # .ci/run sets it: CI must have a server
    assert postgres.missing_reason() is None, "ZEROPLAN_REQUIRE_POSTGRES is set: " + str(postgres.missing_reason())
    with postgres.server() as url:
        yield url


def test_three_workers_on_postgres_measure_each_grid_point_once_and_survive_a_killed_one(tmp_path, pg_server):
    storage = postgres.new_database(pg_server, "killed")
    victim, *others = start_workers(3, out=tmp_path, storage=storage, grid=GRID)
    kill_mid_trial(victim, out=tmp_path, storage=storage)
    finish(others)
    study = the_study(storage)
    trials = study.get_trials(deepcopy=False)
    killed = [t for t in trials if t.user_attrs.get("worker", {}).get("pid") == victim.pid
              and t.state != optuna.trial.TrialState.COMPLETE]
    assert [t.state.name for t in killed] == ["FAIL"]  # failed by the others through its heartbeat
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retry) == 1 and retry[0].params == killed[0].params and retry[0].state.name == "COMPLETE"
    measured = [t for t in trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    points = sorted(tuple(sorted(t.params.items())) for t in measured)
    assert len(points) == 8 and len(set(points)) == 8  # every grid point measured, each once
    assert {t.state.name for t in trials} <= {"COMPLETE", "FAIL"}  # nothing left running or waiting
    ran = runs(tmp_path)
    assert sum(ran.values()) == 8 and ran[f"trial-{killed[0].number:04d}"] is False  # no plan ran twice
    assert len({t.user_attrs["worker"]["pid"] for t in measured}) >= 2  # the work was shared
    report = subprocess.run([sys.executable, "-m", "zeroplan", "report", str(tmp_path), "--storage", storage],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert len(pd.read_csv(tmp_path / "trials.csv")) == len(trials)


def test_tuners_started_at_once_on_a_new_sqlite_file_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    grid = {**GRID, "zero_optimization.stage": {"choices": [0, 1]}}
    outputs = finish(start_workers(3, out=tmp_path, storage=storage, grid=grid))
    assert all("cannot open the study storage" not in o for o in outputs)
    study = the_study(storage)
    measured = [t for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    points = [tuple(sorted(t.params.items())) for t in measured]
    assert len(points) == len(set(points)) == 4 and sum(runs(tmp_path).values()) == 4


TINY_SPACE = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": "auto"},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "autotuning": {"sampler": "grid", "pruner": "none", "max_trials": 2, "warmup_steps": 1,
                             "measured_steps": 1, "space": {"zero_optimization.stage": {"choices": [1, 2]}}}}


def autotune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroplan", "autotune", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_workers_flag_runs_real_two_process_trials_on_one_postgres_study(tmp_path, pg_server):
    """`--workers 2`: the real `zeroplan train` on 2 processes of the tiny preset, one grid point each."""
    storage = postgres.new_database(pg_server, "workers")
    (tmp_path / "c.json").write_text(json.dumps(TINY_SPACE))
    done = autotune("c.json", "--cluster", "cpu", "--storage", storage, "--workers", "2", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 tuner workers on one study" in done.stdout and "complete" in done.stdout
    # A worker done first may take the other's point once more: it waits and reuses that result.
    measured = [t for t in the_study(storage).trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert sorted(t.params["zero_optimization.stage"] for t in measured) == [1, 2]
    assert len({t.user_attrs["worker"]["pid"] for t in measured}) == 2  # one trial on each worker
    assert (tmp_path / "out" / "best_plan.json").is_file() and (tmp_path / "out" / "report.md").is_file()


def test_an_unreachable_server_is_a_clear_error_with_the_password_masked(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(TINY_SPACE))
    url = f"postgresql://tuner:s3cret@/study?host={tmp_path / 'nowhere'}"
    done = autotune("c.json", "--cluster", "cpu", "--storage", url, "--out", "out", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot open the study storage postgresql://tuner:***@/study?" in done.stderr
    assert "s3cret" not in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_a_missing_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg fails as if not installed
    with pytest.raises(ConfigError) as caught:
        open_storage("postgresql://tuner:s3cret@db.example/study")
    text = caught.value.problems[0].render()
    assert "its database driver is not installed" in text and "zeroplan[postgres]" in text
    assert "tuner:***@db.example" in text and "s3cret" not in text
