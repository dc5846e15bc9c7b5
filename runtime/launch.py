"""Launch the training processes of a plan, and name the cause when they fail.

`zeroplan train PLAN` runs the built-in loop (`python -m zeroplan.runtime.train`) and
`zeroplan train PLAN -- script.py ARGS` the user's script (`python -m zeroplan.runtime.rank
script.py ARGS`; its `zeroplan.initialize(model)` finds the plan through $ZEROPLAN_PLAN) as
every rank: under torch's elastic agent (torchrun, run by agent.py) with the plan's process
count, or directly when the plan has one rank.

Nothing outlives the launch (DESIGN, "Processes"): the child runs in a session of its own and
is bound to this process (lifeline.py: a kill -9 here ends it), the ranks are bound to the
agent, and SIGTERM, SIGINT or SIGHUP here stop it (SIGTERM, then SIGKILL to its process group
LAUNCHER_STOP_S later). A `zeroplan train` that the tuner started is bound to the tuner.

The ranks report how they end into a private directory (rundir.py), read by diagnose.py when
the run fails, then removed; one left by a launcher that was killed is removed by the next
launch. The failure is also appended to the metrics file, where the tuner reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from zeroplan.schemas import ConfigError, Plan, Problem

from . import lifeline, procs, rundir
from .diagnose import RunFailure, diagnose, oom_kill_count
from .dist import check_device
from .failure import REPORT_DIR_ENV
from .initialize import PLAN_ENV

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def command(*, plan: Plan, target: list[str], module: bool, log_dir: Path | None = None) -> list[str]:
    """The argv that starts `target` (a module with its args, or a script with its args) on every rank."""
    if plan.world.nnodes != 1:
        raise ConfigError(Problem("world.nnodes", f"`zeroplan train` launches one node, the plan has "
                                  f"{plan.world.nnodes}", suggestion="run the emitted launch script on every node"))
    entry = ["-m", *target] if module else ["-m", "zeroplan.runtime.rank", *target]
    if plan.world.world_size == 1:
        return [sys.executable, *entry]
    logs = ["--log-dir", str(log_dir)] if log_dir is not None else []
    return [sys.executable, "-m", "zeroplan.runtime.agent", "--nnodes", "1",
            "--nproc-per-node", str(plan.world.nproc_per_node), "--master-addr", "127.0.0.1",
            "--master-port", str(procs.free_port()), "--shutdown-timeout", str(lifeline.AGENT_SHUTDOWN_S), *logs, *entry]


def launch(*, plan_path: Path, target: list[str], module: bool, env: dict | None = None,
           metrics: Path | None = None) -> RunFailure | None:
    """Run the training processes to completion; None when they succeed, else why they failed
    (also appended to `metrics` as a `{"failure": true, ...}` line)."""
    plan = Plan.load(plan_path)
    check_device(plan.world)
    lifeline.bind_to_parent(grace_s=lifeline.LAUNCHER_STOP_S + 1)
    root = rundir.default_root()
    rundir.sweep(root)
    reports = rundir.make_private_dir(root, kind="run")
    lifeline.at_emergency_exit(lambda: shutil.rmtree(reports, ignore_errors=True))
    try:
        argv = command(plan=plan, target=target, module=module, log_dir=reports / "torchelastic")
        child_env = lifeline.child_env({**os.environ, **(env or {}), PLAN_ENV: str(Path(plan_path).resolve()),
                                        REPORT_DIR_ENV: str(reports)})
        if plan.world.device == "cpu":
            child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.world.nproc_per_node)))
        oom_before = oom_kill_count()
        code, stopped_by = _run(argv, env=child_env)
        if stopped_by is not None:
            failure = RunFailure(kind="terminated", exit_code=128 + stopped_by,
                                 cause=f"interrupted by {signal.Signals(stopped_by).name}; the ranks were stopped")
        elif code == 0:
            return None
        else:
            failure = diagnose(reports, world_size=plan.world.world_size, timeout_s=plan.world.collective_timeout_s,
                               exits={0: code} if plan.world.world_size == 1 else None,
                               oom_kills=oom_kill_count() - oom_before) or _launcher_failure(code)
    finally:
        shutil.rmtree(reports, ignore_errors=True)
    _append(metrics, failure.record())
    return failure


def _launcher_failure(code: int) -> RunFailure:
    if code < 0:
        return RunFailure(kind="killed", cause=f"the launcher was killed by {signal.Signals(-code).name}")
    return RunFailure(kind="exit", cause=f"the launcher exited with status {code} before any rank reported; "
                      "its output above says why")


def _run(argv: list[str], *, env: dict) -> tuple[int | None, int | None]:
    """(the child's exit status, the signal that stopped it from here or None)."""
    child = subprocess.Popen(argv, env=env, start_new_session=True)
    stopped: list[int] = []

    def stop(signum, frame):  # ends the wait below
        stopped.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in _STOP_SIGNALS}
    try:
        return child.wait(), None
    except KeyboardInterrupt:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # SIGTERM: the agent stops its ranks; SIGKILL to its group if it outlasts LAUNCHER_STOP_S
        return procs.stop_group(child, grace_s=lifeline.LAUNCHER_STOP_S, kill_wait_s=None), stopped[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _append(path: Path | None, record: dict) -> None:
    if path is None:
        return
    try:
        with Path(path).open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError:
        pass
