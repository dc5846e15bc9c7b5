"""Why a run failed, from its ranks' own reports (failure.py) and the exit statuses of the ranks
whose failure ended it (agent.py): which rank, and what happened to it.

The root cause is the most telling report, then the earliest: a fatal signal, SIGKILL (the
kernel's out-of-memory killer when the cgroup's oom_kill count rose during the run), an
out-of-memory error, a ConfigError, a non-finite step (the rank whose own loss was non-finite
first), any other exception or exit status; only then a collective timeout (a symptom: the
ranks that did not time out are named as the ones that did not join, with where they were),
a lost connection (a consequence of a peer's death), and last SIGTERM (the launcher stopping
a rank because another failed, or the user interrupting the run).
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

from zeroplan.schemas import Problem
from zeroplan.schemas.steps import FailureRecord

from .agent import EXITS_FILE
from .failure import fault_path, interesting, record_path

_PRIORITY = {"crash": 0, "killed": 0, "oom": 0, "config": 0, "nonfinite": 0, "exception": 0, "exit": 0,
             "timeout": 1, "peer_lost": 2, "terminated": 3}
_FATAL = {"Segmentation fault": signal.SIGSEGV, "Bus error": signal.SIGBUS, "Aborted": signal.SIGABRT,
          "Floating-point exception": signal.SIGFPE, "Floating point exception": signal.SIGFPE,
          "Illegal instruction": signal.SIGILL}
_FRAME = re.compile(r'File "(.+)", line (\d+) in (\S+)')


@dataclass(frozen=True)
class RunFailure:
    """What `zeroplan train` prints (`cause`) and exits with, and what a trial records."""

    kind: str
    cause: str
    """One line: "rank 1: killed by SIGSEGV (Segmentation fault) at model.py:12 in forward"."""
    detail: str = ""
    """The failing rank's traceback or fault dump, for a log."""
    rank: int | None = None
    problems: tuple[Problem, ...] = ()
    """A ConfigError's problems (kind "config"), to print as the CLI prints any user error."""
    source: str | None = None
    exit_code: int = 1
    """2 for a user error, 128 + signal for an interrupted run, else 1."""

    def record(self) -> FailureRecord:
        """The failure's line in the metrics file the tuner reads (autotune/runner.py)."""
        return FailureRecord(rank=self.rank, kind=self.kind, cause=self.cause, detail=self.detail[-4000:])


@dataclass
class _Report:
    rank: int
    kind: str
    cause: str
    time: float = float("inf")
    origin: bool = False
    detail: str = ""
    extra: dict = field(default_factory=dict)


def diagnose(directory: Path, *, world_size: int, exits: dict[int, int] | None, timeout_s: float,
             oom_kills: int = 0) -> RunFailure | None:
    """The cause of a failed run, or None when no rank says anything (the launcher then reports
    its own exit status). `exits`: exit status by rank when the launcher has it itself (one
    rank, no agent); else the agent's file is read. `oom_kills`: kills by the kernel's
    out-of-memory killer in this cgroup during the run."""
    exits = exits if exits is not None else _read_exits(directory)
    reports = [r for rank in range(world_size) if (r := _rank_report(directory, rank, exits.get(rank), oom_kills))]
    if not reports:
        return None
    root = min(reports, key=lambda r: (_PRIORITY[r.kind], not r.origin, r.time, r.rank))
    if root.kind == "config":
        return RunFailure(kind="config", cause=root.cause, rank=root.rank, exit_code=2,
                          problems=tuple(Problem(**p) for p in root.extra.get("problems", [])),
                          source=root.extra.get("source"))
    cause, detail = root.cause, root.detail
    if root.kind == "timeout":
        cause, detail = _absent(root, reports, world_size=world_size, timeout_s=timeout_s)
    return RunFailure(kind=root.kind, cause=cause, detail=detail, rank=root.rank)


def _rank_report(directory: Path, rank: int, exitcode: int | None, oom_kills: int) -> _Report | None:
    record = _read_json(record_path(directory, rank)) or {}
    fault = _read_text(fault_path(directory, rank))
    when = record.get("time", float("inf"))
    if fault:
        return _fault_report(rank, fault, when)
    if exitcode is not None and exitcode < 0 and record.get("state") != "failed":
        return _signal_report(rank, -exitcode, oom_kills=oom_kills)
    if record.get("state") != "failed":
        if exitcode:  # ended with a status and no report: before its entry ran, or by os._exit
            return _Report(rank=rank, kind="exit", cause=f"rank {rank}: exited with status {exitcode} (no report)")
        return None
    kind, where, message = record.get("kind", "exception"), record.get("where", "?"), record.get("message", "")
    cause = {
        "config": message,
        "oom": f"rank {rank}: out of memory: {message} (at {where})",
        "nonfinite": f"rank {rank}: {message.split(': ', 1)[-1]}",
        "exit": f"rank {rank}: {message} (at {where})",
        "terminated": f"rank {rank}: {message} (at {where})",
        "peer_lost": f"rank {rank}: lost its connection to another rank in "
                     f"{record.get('collective') or 'a collective'} (at {where})",
    }.get(kind, f"rank {rank}: {message} (at {where})")
    return _Report(rank=rank, kind=kind, cause=cause, time=when, origin=bool(record.get("origin")),
                   detail=record.get("traceback", ""), extra=record)


def _fault_report(rank: int, fault: str, when: float) -> _Report:
    """A faulthandler dump: "Fatal Python error: Segmentation fault" and the frames, innermost first."""
    name = next((n for n in _FATAL if n in fault), None)
    sig = f"{_FATAL[name].name} ({name})" if name else "a fatal signal"
    frames = [m for m in _FRAME.finditer(fault) if interesting(m.group(1))] or list(_FRAME.finditer(fault))
    at = f" at {frames[0].group(1)}:{frames[0].group(2)} in {frames[0].group(3)}" if frames else ""
    return _Report(rank=rank, kind="crash", cause=f"rank {rank}: killed by {sig}{at}", time=when, detail=fault)


def _signal_report(rank: int, signum: int, *, oom_kills: int) -> _Report:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL and oom_kills:
        return _Report(rank=rank, kind="oom", cause=f"rank {rank}: killed by the kernel's out-of-memory killer "
                       "(SIGKILL; the cgroup's oom_kill count rose during the run)")
    why = " (kill -9, or the kernel's out-of-memory killer)" if signum == signal.SIGKILL else ""
    kind = "terminated" if signum in (signal.SIGTERM, signal.SIGINT) else "killed"
    return _Report(rank=rank, kind=kind, cause=f"rank {rank}: killed by {name}{why}")


def _absent(root: _Report, reports: list[_Report], *, world_size: int, timeout_s: float) -> tuple[str, str]:
    """A timeout's cause names the ranks that did not join the collective, and where each was."""
    waiting = {r.rank for r in reports if r.kind in ("timeout", "peer_lost")}
    where = {r.rank: r.extra.get("where") for r in reports if r.kind == "terminated"}
    absent = [rank for rank in range(world_size) if rank not in waiting]
    what = root.extra.get("collective") or "a collective"
    cause = (f"rank {root.rank}: {what} timed out after {timeout_s:g} s (failures.collective_timeout_s) at "
             f"{root.extra.get('where', '?')}")
    if absent:
        places = "; ".join(f"rank {r} was at {where[r]}" for r in absent if where.get(r))
        cause += f"; rank(s) {', '.join(map(str, absent))} did not join it" + (f" ({places})" if places else "")
    return cause, root.detail


def _read_exits(directory: Path) -> dict[int, int]:
    data = _read_json(directory / EXITS_FILE) or {}
    return {int(rank): int(v["exitcode"]) for rank, v in data.items()}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def oom_kill_count() -> int:
    """Processes the kernel's out-of-memory killer has killed in this cgroup (v2), or 0 when unknown."""
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
        events = (Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.events").read_text()
    except (OSError, StopIteration):
        return 0
    match = re.search(r"^oom_kill (\d+)$", events, re.M)
    return int(match.group(1)) if match else 0
