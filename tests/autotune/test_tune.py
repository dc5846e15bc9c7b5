"""The tuner against a real Optuna study in a real SQLite file, with real child processes."""

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

from zeroplan.autotune.tune import TuneSettings, tune
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ConfigError, Plan

from .conftest import tiny_config, trial_dirs

TINY = MODEL_PRESETS["tiny"]
CPU = CLUSTER_PRESETS["cpu"]
GRID = {"zero_optimization.stage": {"choices": [0, 1, 2, 3]}, "train_micro_batch_size_per_gpu": {"choices": [2, 4]}}


def settings(out: Path, **kw) -> TuneSettings:
    base = dict(model_name="tiny", nproc_per_node=2, out_dir=out, max_trials=8, sampler="grid", pruner="none",
                warmup_steps=1, measured_steps=3, trial_timeout_s=60, seed=0, warm_start=0)
    base.update(kw)
    return TuneSettings(**base)


def test_candidates_over_the_memory_budget_are_pruned_without_a_run(tmp_path, fake_launcher):
    small_box = CPU.model_copy(update={"device_memory_bytes": 64 * 2**20, "host_memory_bytes": 128 * 2**20})
    result = tune(data=tiny_config(autotuning={"space": GRID}), model=TINY, cluster=small_box,
                  settings=settings(tmp_path, max_trials=3), launcher=fake_launcher())
    assert result.counts == {"pruned": 3}
    for t in result.study.trials:
        assert "GiB/rank >" in t.user_attrs["reason"] and "GiB budget" in t.user_attrs["reason"]
    assert trial_dirs(tmp_path) == []  # no subprocess was started
    assert result.best_plan is None and "No trial completed" in (tmp_path / "report.md").read_text()


def test_crash_hang_and_nan_are_recorded_and_the_study_goes_on(tmp_path, fake_launcher):
    launcher = fake_launcher({0: "crash", 1: "hang", 2: "nan"})
    result = tune(data=tiny_config(autotuning={"space": GRID}), model=TINY, cluster=CPU,
                  settings=settings(tmp_path, trial_timeout_s=3), launcher=launcher)
    by_stage: dict[int, set[str]] = {}
    for t in result.study.trials:
        by_stage.setdefault(t.params["zero_optimization.stage"], set()).add(
            t.state.name if t.state.name == "COMPLETE" else t.user_attrs["reason"].split(" (")[0].split(" at ")[0])
    assert by_stage == {0: {"crashed"}, 1: {"timed out after 3 s"}, 2: {"loss is nan"}, 3: {"COMPLETE"}}
    crashed = next(t for t in result.study.trials if t.params["zero_optimization.stage"] == 0)
    assert "injected crash" in crashed.user_attrs["log_tail"]
    best = Plan.load(tmp_path / "best_plan.json")
    assert best.zero.stage == 3 and best.batch.micro_batch_size == 4  # larger micro-batch is faster here
    assert best.provenance.study_name == result.study.study_name and best.provenance.measured_samples_per_s > 0
    frame = pd.read_csv(tmp_path / "trials.csv")
    assert len(frame) == 8 and set(frame["state"]) == {"complete", "fail"}
    assert "trial" in (tmp_path / "report.html").read_text()


def test_a_candidate_that_compiles_to_a_seen_plan_is_not_run_again(tmp_path, fake_launcher):
    data = tiny_config(autotuning={"space": GRID})
    s = settings(tmp_path, sampler="random", max_trials=2)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = tune(data=data, model=TINY, cluster=CPU, settings=s, launcher=fake_launcher(), callbacks=[])
    study = optuna.load_study(study_name=result.study.study_name, storage=storage)
    params = study.trials[0].params
    study.enqueue_trial(params)
    tune(data=data, model=TINY, cluster=CPU, settings=settings(tmp_path, sampler="random", max_trials=3),
         launcher=fake_launcher())
    study = optuna.load_study(study_name=result.study.study_name, storage=storage)
    repeat = study.trials[2]
    assert repeat.params == params and repeat.user_attrs["duplicate_of"] == 0
    assert repeat.values == study.trials[0].values
    assert len(trial_dirs(tmp_path)) == 2


def test_nothing_to_tune_is_a_clear_error(tmp_path, fake_launcher):
    with pytest.raises(ConfigError, match="nothing to tune"):
        tune(data={"train_batch_size": 8}, model=TINY, cluster=CPU, settings=settings(tmp_path),
             launcher=fake_launcher())


KILLABLE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.autotune.conftest import FAKE_TRAINER, tiny_config
    from tests.autotune.test_tune import GRID, settings
    from zeroplan.autotune.tune import tune
    from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS
    out = Path(sys.argv[1])
    script = out / "fake.py"
    script.write_text(FAKE_TRAINER.replace("out.flush()", "out.flush(); time.sleep(0.3)"))
    tune(data=tiny_config(autotuning={{"space": GRID}}), model=MODEL_PRESETS["tiny"], cluster=CLUSTER_PRESETS["cpu"],
         settings=settings(out), launcher=lambda p, n, m: [sys.executable, str(script), str(p), str(n), str(m)])
''')


def _finished_runs(out: Path) -> list[Path]:
    runs = (out / "trials").glob("*/trial-*/metrics.jsonl")
    return [m for m in runs if '"summary": true' in m.read_text()]


def test_kill_and_resume_continues_the_same_study(tmp_path, fake_launcher):
    env = {**os.environ, "FAKE_BEHAVIOUR": "{}"}
    script = KILLABLE.format(root=str(Path(__file__).parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, start_new_session=True)
    # Watch the trials' files, not the database: opening a new SQLite study from two processes
    # at once races on creating its schema.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_finished_runs(tmp_path)) < 4:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    before = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(before) >= 3, "the tuner did not get going"
    result = tune(data=tiny_config(autotuning={"space": GRID}), model=TINY, cluster=CPU, settings=settings(tmp_path),
                  launcher=fake_launcher())
    after = {t.number: t for t in result.study.trials}
    for t in before:  # finished trials are kept, not re-run
        assert after[t.number].state.name == "COMPLETE" and after[t.number].values == t.values
    finished = [t for t in result.study.trials if t.state.is_finished()]
    assert len(finished) == 8
    done = [json.dumps(t.params, sort_keys=True) for t in finished]
    assert len(done) == len(set(done)), "a grid point ran twice"
