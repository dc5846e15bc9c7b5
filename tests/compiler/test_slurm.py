"""The emitted launch.sbatch, checked by Slurm itself: `sbatch --test-only` on a two-node cluster
of this machine's own daemons (slurm_cluster.py) accepts the script of a two-node plan, CPU and
GPU, and refuses a script that asks for what the cluster lacks or that Slurm cannot parse, so the
check can fail. Skipped, saying why, where Slurm is not installed or we are not root; under
.ci/run (ZEROPLAN_REQUIRE_SLURM) a missing Slurm fails instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import slurm_cluster
from zeroplan.compiler import compile
from zeroplan.compiler.emit import emit
from zeroplan.schemas import ClusterSpec, ModelSpec, load_config

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1},
          "parallel": {"pp": 2}}


@pytest.fixture(scope="module")
def slurm_env():
    reason = slurm_cluster.missing_reason()
    if reason is not None and not os.environ.get("ZEROPLAN_REQUIRE_SLURM"):
        pytest.skip(reason)
    assert reason is None, f"ZEROPLAN_REQUIRE_SLURM is set: {reason}"
    with slurm_cluster.cluster() as env:
        yield env


def _sbatch(out: Path, *, cluster: str, nproc: int) -> Path:
    config, model = load_config(CONFIG), ModelSpec.load("tiny")
    machines = ClusterSpec.load(cluster).with_shape(nnodes=2, nproc_per_node=nproc)
    emit(compile(config, model, machines), config=config, model=model, cluster=machines, out=out)
    return out / "launch.sbatch"


@pytest.mark.parametrize("cluster, nproc", [("cpu", 2), ("h100-80", 8)])
def test_slurm_accepts_the_sbatch_of_a_two_node_plan(tmp_path, slurm_env, cluster, nproc):
    script = _sbatch(tmp_path, cluster=cluster, nproc=nproc)
    assert ("#SBATCH --gpus-per-node=8" in script.read_text()) == (cluster != "cpu")
    done = slurm_cluster.test_only(script, env=slurm_env)
    assert done.returncode == 0 and " to start at " in done.stderr, done.stderr
    assert "on nodes zp[1-2]" in done.stderr, done.stderr  # both nodes, one task each


@pytest.mark.parametrize("change, refusal", [
    (("--nodes=2", "--nodes=3"), "Requested node configuration is not available"),
    (("--gpus-per-node=8", "--gpus-per-node=9"), "Requested node configuration is not available"),
    (("--nodes=2", "--nodes=two"), '"two" is not a valid node count'),
    (("--ntasks-per-node=1", "--ntasks-per-nodes=1"), "unrecognized option '--ntasks-per-nodes=1'"),
])
def test_slurm_refuses_a_script_it_cannot_run_or_parse(tmp_path, slurm_env, change, refusal):
    script = _sbatch(tmp_path, cluster="h100-80", nproc=8)
    old, new = change
    text = script.read_text()
    assert f"#SBATCH {old}\n" in text
    script.write_text(text.replace(f"#SBATCH {old}\n", f"#SBATCH {new}\n"))
    done = slurm_cluster.test_only(script, env=slurm_env)
    assert done.returncode != 0 and refusal in done.stderr, done.stderr
