"""A study is keyed by what it measures (autotune/identity.py): two models tuned into one
directory get two studies and share nothing; the same tune resumes its study; `zeroplan train`
refuses a best plan for another model. Plus: a warm start leaves no phantom WAITING trial, and a
model whose forward returns no loss fails its trial with a reason the user can act on.

Real Optuna studies in one real SQLite file; trials are the stand-in trainer (conftest.py),
except the last test's, which is a real `zeroplan train` at one process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pandas as pd
import yaml

import zeroplan
from zeroplan.autotune.identity import identity_digest, model_identity, model_mismatch
from zeroplan.autotune.models import TrialWorkload
from zeroplan.autotune.tune import Tuner, TuneSettings, tune
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, Plan

from .conftest import tiny_config, trial_dirs

TINY = MODEL_PRESETS["tiny"]
DEEPER = TINY.model_copy(update={"name": "models.py:build_b", "layers": 2 * TINY.layers})
CPU = CLUSTER_PRESETS["cpu"]
SPACE = {"zero_optimization.stage": {"choices": [0, 1, 2, 3]}, "train_micro_batch_size_per_gpu": {"choices": [2, 4]}}


def zeroplan_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroplan", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _settings(out: Path, model: str, **kw) -> TuneSettings:
    base = dict(model_name=model, nproc_per_node=2, out_dir=out, launch_dir=out, max_trials=2, sampler="random",
                pruner="none", warmup_steps=1, measured_steps=2, trial_timeout_s=60, seed=0, warm_start=3)
    return TuneSettings(**{**base, **kw})


def _identity(**kw) -> str:
    data = kw.pop("data", tiny_config(autotuning={"space": SPACE}))
    tuner = Tuner(data=data, model=kw.pop("model", TINY), cluster=kw.pop("cluster", CPU),
                  settings=_settings(Path("out"), kw.pop("model_name", "tiny"), **kw))
    return identity_digest(tuner.identity())


def test_every_part_of_what_is_measured_changes_the_identity_and_nothing_else_does(monkeypatch):
    same = _identity()
    assert _identity(max_trials=50, study_name="mine", sampler="tpe", trial_timeout_s=5, seed=3) == same
    measured_again = CPU.model_copy(update={"rates": CPU.rates.model_copy(update={"intra_node_bandwidth": 1.0})})
    assert _identity(cluster=measured_again) == same  # a new probe of the same machine: its figures only rank
    others = {
        "model": _identity(model=DEEPER),
        "builder": _identity(model_name="models.py:build_a"),
        "world": _identity(nproc_per_node=4),
        "nodes": _identity(nnodes=2),
        "cluster": _identity(cluster=CPU.model_copy(update={"device_memory_bytes": 2 * CPU.device_memory_bytes})),
        "space": _identity(data=tiny_config(autotuning={"space": {**SPACE, "zero_optimization.stage": {
            "choices": [1, 2]}}})),
        "config": _identity(data=tiny_config(autotuning={"space": SPACE}, gradient_clipping=0.5)),
        "objective": _identity(objective="latency"),
        "steps": _identity(measured_steps=9),
    }
    monkeypatch.setattr(zeroplan, "__version__", "9.9.9")
    others["version"] = _identity()
    assert same not in others.values() and len(set(others.values())) == len(others), others


def test_two_models_in_one_directory_get_two_studies_and_train_refuses_the_other(tmp_path, fake_launcher):
    (tmp_path / "models.py").write_text("")  # the builders' file (the stand-in trainer never imports it)
    data = tiny_config(autotuning={"space": SPACE})
    notices: list[str] = []
    first = tune(data=data, model=TINY, cluster=CPU, settings=_settings(tmp_path, "models.py:build_a"),
                 launcher=fake_launcher(), notify=notices.append)
    a = first.study.study_name
    # the warm start enqueued only what the run ran: nothing is left WAITING, nothing counted as waiting
    assert first.counts == {"complete": 2} and not notices
    assert [t.state.name for t in first.study.trials] == ["COMPLETE", "COMPLETE"]
    rows = pd.read_csv(tmp_path / "trials.csv", dtype=str)
    assert len(rows) == 2 and set(rows["state"]) == {"complete"}
    params = rows[[c for c in rows.columns if c.startswith("param:")]]
    assert params.map(str.isdigit).all().all(), params  # integer parameters print as integers: 4, never 4.0

    second = tune(data=data, model=DEEPER, cluster=CPU, settings=_settings(tmp_path, "models.py:build_b"),
                  launcher=fake_launcher(), notify=notices.append)
    b = second.study.study_name
    assert b != a and second.counts == {"complete": 2}
    assert all("duplicate_of" not in t.user_attrs for t in second.study.trials)  # nothing reused from a
    (notice,) = notices
    assert f"holds study {a}" in notice and "model: " in notice and "build_a" in notice and "build_b" in notice
    assert f"starting study {b}" in notice
    assert len(trial_dirs(tmp_path)) == 4, trial_dirs(tmp_path)  # each study its own trials' folders

    best = Plan.load(tmp_path / "best_plan.json")
    assert best.provenance.study_name == b and best.provenance.model_identity["ref"].endswith("models.py:build_b")
    assert best.provenance.model_identity["params"] == str(DEEPER.total_params)
    summaries = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'study.db'}")
    assert sorted(s.study_name for s in summaries) == sorted([a, b])

    again = tune(data=data, model=TINY, cluster=CPU, settings=_settings(tmp_path, "models.py:build_a", max_trials=3),
                 launcher=fake_launcher(), notify=notices.append)
    assert again.study.study_name == a and again.counts == {"complete": 3} and len(notices) == 1  # resumed
    assert Plan.load(tmp_path / "best_plan.json").provenance.study_identity != best.provenance.study_identity

    second_best = tmp_path / "b_plan.json"
    best.save(second_best)
    run = zeroplan_cli("train", str(second_best), "--model", "models.py:build_a", "--steps", "1", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "was tuned for the model" in run.stderr and "build_b" in run.stderr and "build_a" in run.stderr


def test_how_train_compares_a_given_model_with_the_one_a_plan_was_tuned_for(tmp_path):
    (tmp_path / "m.py").write_text("")
    (tmp_path / "train.py").write_text("print(1)\n")

    def recorded(**kw) -> dict:
        return model_identity(TrialWorkload(cwd=tmp_path, **kw), TINY)

    builder = recorded(model="m.py:build")
    assert model_mismatch(builder, TrialWorkload(model=str(tmp_path / "m.py") + ":build", cwd=Path("/"))) is None
    assert "another model" in model_mismatch(builder, TrialWorkload(model="tiny", cwd=tmp_path))
    moved = {**builder, "ref": "/elsewhere/m.py:build"}  # a plan copied from another machine
    assert model_mismatch(moved, TrialWorkload(model="m.py:build", cwd=tmp_path)) is None
    assert model_mismatch(builder, TrialWorkload(script=("train.py",), cwd=tmp_path)) is None  # it may build that model
    tiny = recorded(model="tiny")
    assert model_mismatch(tiny, TrialWorkload(model="tiny", cwd=tmp_path)) is None
    assert "another model" in model_mismatch(tiny, TrialWorkload(model="small", cwd=tmp_path))
    script = recorded(script=("train.py", "--size", "big"))
    assert model_mismatch(script, TrialWorkload(script=("train.py",), cwd=tmp_path)) is None
    assert "run it as" in model_mismatch(script, TrialWorkload(model="tiny", cwd=tmp_path))
    (tmp_path / "other.py").write_text("print(2)\n")
    assert "is not" in model_mismatch(script, TrialWorkload(script=("other.py",), cwd=tmp_path))
    assert model_mismatch({}, TrialWorkload(model="small", cwd=tmp_path)) is None  # compiled, not tuned: unchecked


LOSSLESS = textwrap.dedent('''
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    class NoLabels(torch.nn.Module):
        """A Hugging Face causal LM called without labels: its output's loss is None."""
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.head = torch.nn.Linear(8, 16)

        def forward(self, input_ids):
            return CausalLMOutputWithCrossAttentions(logits=self.head(self.embed(input_ids)))

    def build():
        return NoLabels(), lambda micro, index: {"input_ids": torch.randint(0, 16, (micro, 4))}
''')


def test_a_forward_without_a_loss_fails_its_trial_saying_what_to_do(tmp_path):
    (tmp_path / "nolabels.py").write_text(LOSSLESS)
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "autotuning": {"space": {"zero_optimization.stage": {"choices": [0]}}, "warmup_steps": 1,
                       "measured_steps": 1, "sampler": "grid", "max_trials": 1}}))
    run = zeroplan_cli("autotune", "tune.yaml", "--model", "nolabels.py:build", "--model-spec", "tiny",
                       "--cluster", "cpu", "--nproc-per-node", "1", "--out", "out", cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    (reason,) = pd.read_csv(tmp_path / "out" / "trials.csv")["reason"]
    assert "forward returned CausalLMOutputWithCrossAttentions with loss None: pass labels or return the loss" \
        in reason, reason
