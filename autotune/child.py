"""Every process the tuner starts, started one way: bound to the tuner, stopped with its group.

The tuner's children are its trials (runner.py), the model measurement (models.py) and the
quick probe (cluster.py); each may start processes of its own (ranks, probe workers). So that
none of them outlives the tuner (DESIGN, "Processes"), `start` runs a child
- in a session of its own, so a signal aimed at the tuner's process group (a terminal's Ctrl-C)
  does not reach it half-way: the tuner stops it itself (`stop`), whole process group included,
  SIGTERM first so it cleans up, SIGKILL `grace_s` later;
- bound to this process through $ZEROPLAN_PARENT_PID: the child calls
  `runtime.lifeline.bind_to_parent()` as it starts and ends when this process dies, kill -9
  included, and binds what it starts to itself the same way.
"""

from __future__ import annotations

import os
import subprocess
from typing import IO, Sequence

from zeroplan.runtime import procs
from zeroplan.runtime.run_env import PARENT_ENV

KILL_GRACE_S = 5.0
"""Seconds a stopped child has to end before its group is killed: more than `zeroplan train`
takes to stop its ranks (runtime.lifeline.LAUNCHER_STOP_S)."""

Output = int | IO | None


def start(command: Sequence[str], *, env: dict[str, str] | None = None, cwd: os.PathLike | str | None = None,
          stdout: Output, stderr: Output, text: bool = False) -> subprocess.Popen:
    """Start `command` (this environment plus `env`) in a session of its own, bound to this process."""
    child_env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
    return subprocess.Popen(list(command), cwd=cwd, env=child_env, stdout=stdout, stderr=stderr, text=text,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen, *, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace_s`; a
    group already gone is left alone, a leader already gone still has its group stopped."""
    procs.stop_group(proc, grace_s=grace_s)


def run(command: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None,
        cwd: os.PathLike | str | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)` for a child
    of the tuner: started by `start`, and stopped by `stop` before a timeout
    (`subprocess.TimeoutExpired`), Ctrl-C or SIGTERM (raised as KeyboardInterrupt by the
    autotune command) goes on."""
    with start(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        finally:
            stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
