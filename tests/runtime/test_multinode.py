"""A plan of two nodes, run on one machine as two nodes: the emitted launch.sh started twice
(each a `zeroplan train` starting its node's 2 ranks), meeting at 127.0.0.1 through torch's c10d
rendezvous, trains the tiny GPT at dp 2 x pp 2 (ranks are laid out pp-major, parallel/topology.py:
each node holds one pipeline stage's dp pair, so the stages' sends cross the node boundary) to
exactly the parameters a one-node run of the same degrees reaches. A dp 4 run whose node is killed mid-run (kill -9 of its `zeroplan train`) ends
the other node's run with an error naming a rank, within a bounded time, and leaves no process
behind: the two nodes had met and trained a step first. A multi-node launch without MASTER_ADDR is
refused before anything starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from rt_processes import MARK, kill_survivors, processes_with, wait_until
from zeroplan.runtime.procs import free_port

SCRIPT = Path(__file__).with_name("mn_train.py")
STEPS = 3
CONFIGS = {"dp4": {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}},
           "dp2-pp2": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                       "zero_optimization": {"stage": 1}, "parallel": {"pp": 2}}}


def _zeroplan(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroplan", *args], capture_output=True, text=True, **kwargs)


def _compile(tmp_path: Path, name: str, *, nnodes: int) -> Path:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(CONFIGS[name]))
    out = tmp_path / f"{name}-{nnodes}n"
    done = _zeroplan("compile", str(config), "--model", "tiny", "--cluster", "cpu", "--nnodes", str(nnodes),
                     "--nproc-per-node", str(4 // nnodes), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def _env(mark: str, port: int) -> dict:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `zeroplan` of this interpreter
    return {**os.environ, "PATH": path, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), MARK: mark,
            "OMP_NUM_THREADS": "1"}


def _start_nodes(plan_dir: Path, weights: Path, *, steps: int, mark: str) -> list[subprocess.Popen]:
    env = _env(mark, free_port())
    return [subprocess.Popen(["bash", str(plan_dir / "launch.sh"), "--", str(SCRIPT), str(weights), str(steps)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]


def test_two_nodes_train_as_one_node_does(tmp_path):
    name, mark = "dp2-pp2", uuid.uuid4().hex
    try:
        nodes = _start_nodes(_compile(tmp_path, name, nnodes=2), tmp_path / "two.pt", steps=STEPS, mark=mark)
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)[-3000:]
        one = _compile(tmp_path, name, nnodes=1)
        done = _zeroplan("train", str(one / "plan.json"), "--", str(SCRIPT), str(tmp_path / "one.pt"), str(STEPS),
                         env=_env(mark, free_port()), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        kill_survivors(mark)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert set(two) == set(one)
    for key, tensor in one.items():
        assert torch.equal(two[key], tensor), f"{key} differs between the two-node and the one-node run"


def test_a_killed_node_ends_the_other_with_the_cause(tmp_path):
    mark = uuid.uuid4().hex
    weights = tmp_path / "never.pt"
    try:
        nodes = _start_nodes(_compile(tmp_path, "dp4", nnodes=2), weights, steps=100_000, mark=mark)
        assert wait_until(lambda: Path(f"{weights}.started").exists() or any(n.poll() is not None for n in nodes),
                          timeout_s=240), "the two nodes never trained a step"
        assert all(n.poll() is None for n in nodes), "a node ended before the kill"
        launcher = [pid for pid in processes_with(mark, argv_has="zeroplan train")]
        assert launcher, "no zeroplan train process found"
        victim = nodes[0]
        os.kill(victim.pid, signal.SIGKILL)  # bash exec'd zeroplan train: this is node 0's launcher
        output = nodes[1].communicate(timeout=180)[0]
        assert nodes[1].returncode not in (0, None)
        assert "error:" in output and "rank" in output, output[-2000:]
        assert "Traceback" not in output.split("error:")[-1], output[-2000:]
        assert wait_until(lambda: not processes_with(mark), timeout_s=60), "processes left behind"
    finally:
        kill_survivors(mark)


def test_multi_node_launch_without_master_addr_is_refused(tmp_path):
    plan = _compile(tmp_path, "dp4", nnodes=2) / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "JOB_ID")}
    done = _zeroplan("train", str(plan), "--steps", "1", env={**env, "JOB_ID": "bad id;rm"}, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "MASTER_ADDR" in done.stderr and "JOB_ID" in done.stderr and "Traceback" not in done.stderr
