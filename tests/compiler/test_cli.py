"""The compile, estimate and probe commands: exit codes, no tracebacks for user errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zeroplan.cli import app
from zeroplan.compiler.memory import FIRST_STEPS_OVERHEAD
from zeroplan.schemas import ClusterSpec, ModelSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt_small_zero2.yaml"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_compile_the_example(tmp_path):
    result = run("compile", EXAMPLE, "--model", "small", "--cluster", "cpu", "--nproc-per-node", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "ZeRO stage 2, batch 16" in result.output
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "report.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--set", "zero_optimization.stagee=2"], "did you mean 'stage'"),
    (["--set", "parallel.tp=4", "--set", "parallel.dp=2"], "dp(2) * tp(4) * pp(1) = 8 != world_size(2)"),
    (["--set", "train_micro_batch_size_per_gpu=auto"], "zeroplan autotune"),
    (["--model", "huge"], "unknown model preset"),
    (["--cluster", "tpu"], "unknown cluster preset"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, args, message):
    base = {"--model": "small", "--cluster": "cpu"}
    for flag in ("--model", "--cluster"):
        if flag in args:
            base[flag] = args[args.index(flag) + 1]
    rest = [a for i, a in enumerate(args) if a not in base and (i == 0 or args[i - 1] not in base)]
    result = run("compile", EXAMPLE, *[x for kv in base.items() for x in kv], "--nproc-per-node", "2",
                 "--out", tmp_path, *rest)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_estimate_model_states_follow_the_zero_paper():
    """The ZeRO paper's partitioning, with the runtime's fp32 gradient buffers (2 bytes more per
    gradient element than the paper's 16-bit ones). With one micro-batch per step (the default)
    stage 1 keeps no whole accumulation buffer: its states are stage 2's."""
    result = run("estimate", "--model", "7b", "--cluster", "h100-80", "--nproc-per-node", "8")
    assert result.exit_code == 0, result.output
    psi, n, gib = ModelSpec.load("7b").total_params, 8, 1 << 30
    expected = {0: 18 * psi, 1: (2 + 16 / n) * psi, 2: (2 + 16 / n) * psi, 3: 18 / n * psi}
    rows = [line.split() for line in result.output.splitlines() if re.match(r"^[0-3]\s+none\s+none\s", line)]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert float(row[7]) == pytest.approx(expected[int(row[0])] / gib, abs=0.006)
    assert rows[0][-1] == "NO" and rows[3][-1] == "yes"


def test_probe_writes_a_cluster_that_compiles(tmp_path):
    cluster = tmp_path / "cluster.json"
    probe = subprocess.run([sys.executable, "-m", "zeroplan", "probe", "--nproc", "2", "--quick", "-o", str(cluster),
                            "--path", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert '"rates_source": "measured"' in cluster.read_text()
    result = run("compile", EXAMPLE, "--model", "small", "--cluster", cluster, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "dp 2" in result.output
    # the memory model's overhead is the probed start-up memory of a rank (plus the first steps')
    started = ClusterSpec.load(cluster).runtime_overhead_bytes
    assert 50 << 20 < started < 2 << 30
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["estimates"]["memory_per_rank"]["overhead"] == started + FIRST_STEPS_OVERHEAD["cpu"]


def test_probe_refuses_a_missing_path(tmp_path):
    result = run("probe", "--path", tmp_path / "missing", "-o", tmp_path / "c.json")
    assert result.exit_code == 2 and "is not a directory" in result.output
