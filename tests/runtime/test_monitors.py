"""DeepSpeed's monitor blocks do what they say: `zeroplan compile` of a config with
`tensorboard`, `csv_monitor`, `wandb` and `flops_profiler` enabled, then `zeroplan train` of the
plan on 2 processes, writes TensorBoard event files, CSV files and a W&B run (offline) that their
own readers load back, with DeepSpeed's event names and the losses the run printed, and prints
one FLOPs profile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from zeroplan.compiler import compile as compile_plan
from zeroplan.compiler.flops import step_flops
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ConfigError, load_config
from zeroplan.schemas.steps import StepRecord, read_records

ZEROPLAN = [sys.executable, "-m", "zeroplan"]
STEPS, GLOBAL_BATCH = 3, 8


def _config(out) -> dict:
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 2}, "wall_clock_breakdown": True, "steps_per_print": 1,
            "comms_logger": {"enabled": True},
            "tensorboard": {"enabled": True, "output_path": str(out / "tb"), "job_name": "run"},
            "csv_monitor": {"enabled": True, "output_path": str(out / "csv"), "job_name": "run"},
            "wandb": {"enabled": True, "project": "zeroplan-test"},
            "flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": 2, "top_modules": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("monitors")
    (out / "config.yaml").write_text(yaml.safe_dump(_config(out)))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(out), "WANDB_SILENT": "true"}
    compiled = subprocess.run([*ZEROPLAN, "compile", str(out / "config.yaml"), "--model", "tiny", "--cluster", "cpu",
                               "--nproc-per-node", "2", "--out", str(out / "plan")],
                              capture_output=True, text=True, timeout=120, env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "flops_profiler" not in compiled.stderr  # acted on: no notice
    run = subprocess.run([*ZEROPLAN, "train", str(out / "plan" / "plan.json"), "--model", "tiny", "--steps",
                          str(STEPS), "--metrics", str(out / "m.jsonl")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [r.loss for r in read_records(out / "m.jsonl") if isinstance(r, StepRecord)]
    assert len(losses) == STEPS
    return out, losses, run.stdout


SAMPLES = [GLOBAL_BATCH * (s + 1) for s in range(STEPS)]
"""DeepSpeed's x-axis: the global samples seen after each step."""


def test_tensorboard_event_files_read_back(trained):
    out, losses, _ = trained
    events = EventAccumulator(str(out / "tb" / "run"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/elapsed_time_ms_forward",
                "Train/Samples/elapsed_time_ms_backward", "Train/Samples/elapsed_time_ms_step",
                "Train/Samples/peak_memory_bytes"):
        assert tag in tags, tags
    loss = events.Scalars("Train/Samples/train_loss")
    assert [e.step for e in loss] == SAMPLES
    assert [e.value for e in loss] == pytest.approx(losses, rel=1e-6)
    assert all(e.value > 0 for e in events.Scalars("Train/Samples/elapsed_time_ms_backward"))


def test_csv_files_have_deepspeeds_layout(trained):
    out, losses, _ = trained
    frame = pd.read_csv(out / "csv" / "run" / "Train_Samples_train_loss.csv")
    assert list(frame.columns) == ["step", "train_loss"]
    assert frame["step"].tolist() == SAMPLES
    assert frame["train_loss"].tolist() == pytest.approx(losses, rel=1e-6)
    lr = pd.read_csv(out / "csv" / "run" / "Train_Samples_lr.csv")
    assert list(lr.columns) == ["step", "lr"] and len(lr) == STEPS


def _wandb_records(path):
    """The protobuf records of a W&B run file (wandb's own Record schema), read from its log
    format: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB-style chunks in 32 KiB
    blocks, each `crc32c(4) length(2) type(1)` + data, type 1 whole, 2/3/4 first/middle/last."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_run_holds_every_step(trained):
    out, losses, _ = trained
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one run, from rank 0 only"
    rows = []
    for record in _wandb_records(next(runs[0].glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    logged = [r for r in rows if "Train/Samples/train_loss" in r]
    assert [r["_step"] for r in logged] == SAMPLES
    assert [r["Train/Samples/train_loss"] for r in logged] == pytest.approx(losses, rel=1e-6)


def test_timers_and_comms_are_printed_every_steps_per_print(trained):
    """DeepSpeed's wall_clock_breakdown and comms_logger lines, on rank 0 only."""
    stdout = trained[2]
    for step in range(1, STEPS + 1):
        assert stdout.count(f"[step {step}] time (ms) | forward: ") == 1, stdout[-2000:]
        assert stdout.count(f"[step {step}] comms | ") == 1
    assert "reduce_scatter_tensor: " in stdout


def _counted(stdout: str, label: str) -> int:
    return int(re.search(rf"{label}:\s+[\d.]+ \w*FLOP \((\d+)\)", stdout).group(1))


def test_rank_zero_prints_the_flops_profile_of_its_step(trained):
    """Step 2's count equals the compiler's analytic figure for the tiny GPT on one rank's 4
    samples (nothing recomputed), with latency, FLOP/s, MFU against the cpu preset's peak and
    the per-module table to module_depth 2."""
    stdout, tiny = trained[2], MODEL_PRESETS["tiny"]
    assert stdout.count("zeroplan FLOPs profiler") == 1, stdout[-3000:]
    assert "Profile of step 2 on rank 0 of 2" in stdout
    expected = step_flops(tiny, tokens=GLOBAL_BATCH // 2 * tiny.seq_len, layers=tiny.layers, head=True)
    counted = {phase: _counted(stdout, f"{phase} FLOPs") for phase in ("forward", "backward", "recomputed forward")}
    assert counted == {"forward": expected.forward, "backward": expected.backward, "recomputed forward": 0}
    assert _counted(stdout, "total FLOPs per step on this rank") == expected.total
    assert re.search(r"achieved FLOP/s, total / step latency:\s+[\d.]+ [kMGT]?FLOP/s", stdout)
    assert re.search(r"MFU, .*:\s+[\d.]+% of 40.00 GFLOP/s peak \(fp32 matmul, nominal\)", stdout)
    assert "Top 2 module classes by forward FLOPs" in stdout and "depth 2: Block " in stdout
    assert "    0 (Block)" in stdout and "lm_head (Linear)" in stdout and "qkv (Linear)" not in stdout


def test_a_monitor_without_its_client_is_refused_at_compile_time(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = load_config(_config(tmp_path))
    with pytest.raises(ConfigError, match="wandb.enabled: wandb needs the wandb package"):
        compile_plan(config, MODEL_PRESETS["tiny"], CLUSTER_PRESETS["cpu"], nproc_per_node=2)
