"""Launch the training processes of a plan, and name the cause when they fail.

`zeroplan train PLAN` runs the built-in loop (`python -m zeroplan.runtime.train`) and
`zeroplan train PLAN -- script.py ARGS` the user's script (`python -m zeroplan.runtime.rank
script.py ARGS`; its `zeroplan.initialize(model)` finds the plan through $ZEROPLAN_PLAN) as
every rank: under torch's elastic agent (torchrun, run by agent.py) with the plan's process
count, or directly when the plan has one rank. A plan of several nodes runs `zeroplan train` on
each (the emitted launch.sh), which starts that node's ranks; the nodes meet at $MASTER_ADDR
(`_rendezvous`), and each node's launcher reports what its own ranks said.

Nothing outlives the launch (DESIGN, "Processes"): the child runs in a session of its own and
is bound to this process (lifeline.py: a kill -9 here ends it), the ranks are bound to the
agent, and SIGTERM, SIGINT or SIGHUP here stop it (SIGTERM, then SIGKILL to its process group
LAUNCHER_STOP_S later). A `zeroplan train` that the tuner started is bound to the tuner.

The ranks report how they end into a private directory (rundir.py), read by diagnose.py when
the run fails, then removed; one left by a launcher that was killed is removed by the next
launch. The failure is also appended to the metrics file, where the tuner reads it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from zeroplan.schemas import ConfigError, Plan, Problem
from zeroplan.schemas.steps import FailureRecord

from . import lifeline, procs, rundir
from .diagnose import RunFailure, diagnose, oom_kill_count
from .dist import check_device
from .run_env import PLAN_ENV, REPORT_DIR_ENV

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def command(*, plan: Plan, target: list[str], module: bool, log_dir: Path | None = None) -> list[str]:
    """The argv that starts `target` (a module with its args, or a script with its args) on
    every rank of this node."""
    entry = ["-m", *target] if module else ["-m", "zeroplan.runtime.rank", *target]
    if plan.world.world_size == 1:
        return [sys.executable, *entry]
    logs = ["--log-dir", str(log_dir)] if log_dir is not None else []
    return [sys.executable, "-m", "zeroplan.runtime.agent", *_rendezvous(plan, os.environ),
            "--nproc-per-node", str(plan.world.nproc_per_node), "--shutdown-timeout", str(lifeline.AGENT_SHUTDOWN_S),
            *logs, *entry]


def _rendezvous(plan: Plan, environ: Mapping[str, str]) -> list[str]:
    """torchrun's arguments for how this node's ranks meet the others: a free local port for one
    node; for several, torch's c10d rendezvous at $MASTER_ADDR:$MASTER_PORT (default 29500) under
    $JOB_ID (default the plan's), where every node's `zeroplan train` (the emitted launch.sh)
    joins. A node that never comes ends the others' wait after the plan's collective timeout."""
    nnodes = plan.world.nnodes
    if nnodes == 1:
        return ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(procs.free_port())]
    problems, addr, port = [], environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "29500")
    job = environ.get("JOB_ID") or f"zeroplan-{plan.provenance.config_hash[:12]}"
    if not _HOST.fullmatch(addr):
        problems.append(Problem("MASTER_ADDR", f"the plan spans {nnodes} nodes, which meet at $MASTER_ADDR: "
                                "it must be the first node's host name or address", given=addr or "(unset)",
                                suggestion="run the plan's launch.sh on every node with the same MASTER_ADDR"))
    if not (port.isdigit() and 0 < int(port) < 65536):
        problems.append(Problem("MASTER_PORT", "must be a TCP port number", given=port,
                                suggestion="a free port on the first node, the same on every node"))
    if not _JOB.fullmatch(job):
        problems.append(Problem("JOB_ID", "must be letters, digits, '.', '_' or '-' (at most 64)", given=job))
    if problems:
        raise ConfigError(problems, source="the multi-node launch environment")
    return ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr}:{port}",
            "--rdzv-id", job, "--rdzv-conf", f"join_timeout={int(plan.world.collective_timeout_s)}"]


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.\-]{0,252})|\[[0-9A-Fa-f:.]+\]")
"""A host name, an IPv4 address or a bracketed IPv6 address: nothing a shell or URL would read more into."""
_JOB = re.compile(r"[A-Za-z0-9._-]{1,64}")


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


def _append(path: Path | None, record: FailureRecord) -> None:
    if path is None:
        return
    try:
        with Path(path).open("a") as f:
            f.write(record.to_line())
    except OSError:
        pass
