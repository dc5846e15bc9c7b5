"""Start one measurement: `world_size` fresh rank processes of bench.worker on one gloo group.

Each rank is its own `python -m bench.worker` process with the variables torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free local port) and one intra-op
thread (OMP_NUM_THREADS=1; the worker also calls torch.set_num_threads(1)). The ranks run in
their own session, so a timeout or a failed rank ends the whole group and nothing lingers.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zeroplan.runtime import procs as runtime_procs

from .systems import get_system
from .workload import Workload


class LaunchError(RuntimeError):
    """A rank failed or the run timed out; the message carries the rank's traceback or log tail."""


@dataclass
class Measurement:
    system: str
    ranks: list[dict]
    """The worker's result of every rank, in rank order."""
    wall_s: float
    notes: list[str] = field(default_factory=list)


def start_main(module: str, argv: list[str] | None) -> tuple[str, Callable[[str], None]]:
    """What every benchmark's `main` does first: SIGTERM exits cleanly (`exit_on_sigterm`);
    returns the command line to record in the results and a logger to stderr."""
    exit_on_sigterm()
    command = f"python -m {module} " + shlex.join(argv if argv is not None else sys.argv[1:])
    return command.strip(), lambda msg: print(msg, file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in a benchmark's main process, so that `launch`'s cleanup
    runs and no rank process outlives a terminated benchmark (ranks run in their own session)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            runtime_procs.signal_group(p, signal.SIGKILL)
        p.wait()


def launch(system: str, workload: Workload, *, timeout_s: float = 900.0) -> Measurement:
    """Run `system` on `workload` in fresh processes; raise LaunchError when any rank fails.

    The free port is found by binding and releasing it, so another process on a shared machine
    can take it before rank 0 listens; that one failure is retried once on a new port."""
    try:
        return _launch(system, workload, timeout_s=timeout_s)
    except LaunchError as e:
        if "address already in use" not in str(e).lower():
            raise
        return _launch(system, workload, timeout_s=timeout_s)


def _launch(system: str, workload: Workload, *, timeout_s: float) -> Measurement:
    cls = get_system(system)
    port = runtime_procs.free_port()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zeroplan-bench-") as tmp:
        procs, outs, logs = [], [], []
        for rank in range(workload.world_size):
            out, log = Path(tmp) / f"rank{rank}.json", Path(tmp) / f"rank{rank}.log"
            env = {**os.environ, **cls.env(), "RANK": str(rank), "WORLD_SIZE": str(workload.world_size),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(workload.world_size),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            with log.open("wb") as f:
                procs.append(subprocess.Popen([sys.executable, "-m", "bench.worker", system, workload.to_json(),
                                               str(out)], env=env, stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True,
                                              cwd=Path(__file__).resolve().parent.parent))
            outs.append(out)
            logs.append(log)
        try:
            _wait(procs, outs, logs, timeout_s=timeout_s)
        finally:
            _kill(procs)
        ranks = [json.loads(o.read_text()) for o in outs]
    return Measurement(system=system, ranks=ranks, wall_s=time.monotonic() - start)


def _wait(procs: list[subprocess.Popen], outs: list[Path], logs: list[Path], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            r = failed[0]
            raise LaunchError(f"rank {r} exited with {procs[r].returncode}:\n{_why(outs[r], logs[r])}")
        if all(p.poll() is not None for p in procs):
            return
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out after {timeout_s:.0f}s:\n{runtime_procs.tail(logs[0], lines=30)}")
        time.sleep(0.1)


def _why(out: Path, log: Path) -> str:
    """The rank's own traceback when it wrote one, else the end of its output."""
    try:
        return json.loads(out.read_text())["error"]
    except (OSError, ValueError, KeyError):
        return runtime_procs.tail(log, lines=30)
