"""User errors of `zeroplan train`, `autotune` and `report` that used to end in a traceback: each
is one clear message and exit status 2, found before any process starts (in-process CLI runs)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from zeroplan.cli import app
from zeroplan.schemas import Plan
from zeroplan.schemas.batch import BatchPlan
from zeroplan.schemas.plan import WorldPlan, ZeroPlan, ParallelPlan

CONFIG = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
AUTOTUNE = ["--model", "tiny", "--cluster", "cpu", "--nproc-per-node", "2", "--max-trials", "1"]


def _fails_cleanly(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output
    return result.output


def _plan(device: str = "cpu") -> Plan:
    return Plan(world=WorldPlan(nnodes=1, nproc_per_node=1, world_size=1, device=device,
                                backend="nccl" if device == "cuda" else "gloo"),
                parallel=ParallelPlan(dp=1), batch=BatchPlan(global_batch_size=2, micro_batch_size=2,
                                                             gradient_accumulation_steps=1),
                zero=ZeroPlan(stage=0, reduce_bucket_size=1, allgather_bucket_size=1, overlap_comm=False,
                              prefetch_bucket_size=0, param_persistence_threshold=0, model_persistence_threshold=0,
                              max_live_parameters=0, max_reuse_distance=0, sub_group_size=1))


def _read_only(path):
    """A directory nobody may write in, root included (the immutable flag), or skip."""
    path.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
        pytest.skip("the immutable flag cannot be set here")
    return path


def test_train_refuses_bad_inputs_without_a_traceback(tmp_path):
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00plan")
    _fails_cleanly(["train", str(tmp_path / "binary.json")], "not a plan: byte 0 is not UTF-8 text")
    _plan().save(tmp_path / "plan.json")
    _fails_cleanly(["train", str(tmp_path / "plan.json"), "--metrics", str(tmp_path)], "--metrics", "is a directory")
    locked = _read_only(tmp_path / "locked")
    try:
        _fails_cleanly(["train", str(tmp_path / "plan.json"), "--metrics", str(locked / "m.jsonl")],
                       "--metrics", "cannot be created", "Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_train_refuses_a_cuda_plan_on_a_machine_without_gpus(tmp_path):
    _plan("cuda").save(tmp_path / "plan.json")
    _fails_cleanly(["train", str(tmp_path / "plan.json")], "world.device", "torch sees no GPU", "--cluster cpu")


def test_autotune_refuses_an_unusable_out_directory(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    config = str(tmp_path / "c.json")
    _fails_cleanly(["autotune", config, *AUTOTUNE, "--out", str(tmp_path / "file")], "--out", "is not a directory")
    _fails_cleanly(["autotune", config, *AUTOTUNE, "--out", str(tmp_path / "loop")], "--out", "leads nowhere")
    _fails_cleanly(["autotune", config, *AUTOTUNE, "--out", str(tmp_path / "loop" / "x")], "--out",
                   "Too many levels of symbolic links")
    locked = _read_only(tmp_path / "locked")
    try:
        _fails_cleanly(["autotune", config, *AUTOTUNE, "--out", str(locked)], "--out", "Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_autotune_and_report_refuse_a_bad_storage(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    config, out = str(tmp_path / "c.json"), str(tmp_path / "out")
    _fails_cleanly(["autotune", config, *AUTOTUNE, "--out", out, "--storage", "nosuchdb://x"],
                   "--storage", "cannot open the study storage nosuchdb://x")
    _fails_cleanly(["autotune", config, *AUTOTUNE, "--out", out, "--storage", "not a url"], "Could not parse")
    (tmp_path / "out" / "study.db").write_bytes(b"this is not a database " * 200)
    _fails_cleanly(["autotune", config, *AUTOTUNE, "--out", out], "file is not a database", "move a damaged")
    _fails_cleanly(["report", out], "file is not a database")


def test_a_truncated_study_is_refused(tmp_path):
    db = tmp_path / "study.db"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=30)
    sqlite3.connect(db).execute("VACUUM").connection.close()
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    _fails_cleanly(["report", str(tmp_path)], "--storage", "cannot open the study storage",
                   "database disk image is malformed")
