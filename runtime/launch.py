"""Launch training processes for a plan: torchrun with the plan's process count, or the
process itself when the plan has one rank.

`zeroplan train PLAN` runs the built-in model (`python -m zeroplan.runtime.train`);
`zeroplan train PLAN -- script.py ARGS` runs the user's script, whose
`zeroplan.initialize(model)` finds the plan through $ZEROPLAN_PLAN.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from zeroplan.schemas import ConfigError, Plan, Problem

from .initialize import PLAN_ENV


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(*, plan: Plan, target: list[str], module: bool) -> list[str]:
    """The argv that starts `target` (a module with its args, or a script with its args)."""
    if plan.world.nnodes != 1:
        raise ConfigError(Problem("world.nnodes", f"`zeroplan train` launches one node, the plan has "
                                  f"{plan.world.nnodes}", suggestion="run the emitted launch script on every node"))
    entry = ["-m", *target] if module else target
    if plan.world.world_size == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(plan.world.nproc_per_node), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), *entry]


def launch(*, plan_path: Path, target: list[str], module: bool, env: dict | None = None) -> int:
    """Run the training processes to completion; their exit status.

    SIGTERM and SIGINT are passed on to the launcher, which stops its ranks: a tuner that kills
    a trial leaves no orphaned training processes.
    """
    plan = Plan.load(plan_path)
    argv = command(plan=plan, target=target, module=module)
    child_env = {**os.environ, **(env or {}), PLAN_ENV: str(Path(plan_path).resolve())}
    if plan.world.device == "cpu":
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.world.nproc_per_node)))
    child = subprocess.Popen(argv, env=child_env)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
