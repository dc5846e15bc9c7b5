"""A rank's own account of how it ended, for the launcher to name the cause (diagnose.py).

`zeroplan train` gives its ranks a private report directory ($ZEROPLAN_REPORT_DIR); each rank
(rank.py) writes there
- `rank-<r>.json`: {"state": "running"} as it starts, replaced (atomically) as it ends by how it
  ended: "finished", or "failed" with the kind of failure, its message, the last frame of the
  traceback outside torch (`where`), the collective it was in, and the traceback;
- `rank-<r>.fault`: Python's faulthandler dump when a fatal signal (SIGSEGV, SIGBUS, SIGFPE,
  SIGABRT, SIGILL) kills it: the signal and the frames it was in.
A rank killed by SIGKILL writes nothing; the agent's record of its exit status says so.

Kinds: "config" (a ConfigError: the user's to fix), "oom", "nonfinite" (NonFiniteError, with
its step), "exception" (anything else raised), "exit" (sys.exit with a status), "timeout" (a
collective that another rank did not join in time: a symptom of that rank), "peer_lost" (a
peer's connection closed mid-collective: a consequence of its death), "terminated" (SIGTERM:
the launcher stopping it, usually because another rank failed).
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path

from zeroplan.schemas import ConfigError
from zeroplan.schemas.atomic import atomic_write_text
from zeroplan.schemas.errors import NOT_GIVEN

from .lifeline import Terminated
from .run_env import REPORT_DIR_ENV
from .precision import NonFiniteError

_TORCH = f"{os.sep}torch{os.sep}"
_DISTRIBUTED = f"{os.sep}torch{os.sep}distributed{os.sep}"
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_LIFELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lifeline.py")
_OOM = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
_TIMEOUT = ("timed out", "timeout")
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


def record_path(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank}.json"


def fault_path(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank}.fault"


def interesting(filename: str) -> bool:
    """A frame worth naming: not torch's, not the standard library's, not a signal handler's."""
    return _TORCH not in filename and not filename.startswith(_STDLIB) and filename != _LIFELINE


def locate(frames: list[traceback.FrameSummary]) -> tuple[str, str | None]:
    """(the innermost frame outside torch and the standard library, as "file:line in function";
    the innermost torch.distributed function, e.g. "all_reduce", or None)."""
    mine = [f for f in frames if interesting(f.filename)] or frames
    where = f"{mine[-1].filename}:{mine[-1].lineno} in {mine[-1].name}" if mine else "?"
    dist = [f.name for f in frames if _DISTRIBUTED in f.filename and not f.name.startswith("_")]
    return where, (dist[-1] if dist else None)


def classify(exc: BaseException) -> dict:
    """The kind of a failure and what the launcher reports with it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where, collective = locate(frames)
    names = {k.__name__ for k in type(exc).__mro__}
    text = str(exc).lower()
    out = {"message": _message(exc), "where": where, "collective": collective,
           "traceback": "".join(traceback.format_exception(exc))[-6000:]}
    if isinstance(exc, ConfigError):
        return {**out, "kind": "config", "source": exc.source,
                "problems": [{"path": p.path, "message": p.message, "suggestion": p.suggestion,
                              **({} if p.given is NOT_GIVEN else {"given": _jsonable(p.given)})}
                             for p in exc.problems]}
    if isinstance(exc, NonFiniteError):
        own = exc.local_loss
        return {**out, "kind": "nonfinite", "step": exc.step, "origin": own is not None and not math.isfinite(own)}
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in names or any(m in text for m in _OOM):
        return {**out, "kind": "oom"}
    in_dist = collective is not None or bool(names & {"DistError", "DistBackendError", "DistStoreError",
                                                      "DistNetworkError"}) or "gloo" in text or "nccl" in text
    if in_dist and any(m in text for m in _TIMEOUT):
        return {**out, "kind": "timeout"}
    if in_dist and any(m in text for m in _PEER_LOST):
        return {**out, "kind": "peer_lost"}
    return {**out, "kind": "exception"}


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class RankReport:
    """This rank's report file (and fault file) in the run's report directory."""

    def __init__(self, *, directory: Path, rank: int):
        self.directory, self.rank = directory, rank
        self._fault_file = None

    @classmethod
    def from_env(cls) -> "RankReport | None":
        directory = os.environ.get(REPORT_DIR_ENV)
        if not directory or not Path(directory).is_dir():
            return None
        return cls(directory=Path(directory), rank=int(os.environ.get("RANK", "0")))

    def start(self) -> None:
        """Mark this rank running, and have fatal signals dump their frames to the fault file."""
        self._write({"state": "running"})
        self._fault_file = fault_path(self.directory, self.rank).open("w")
        faulthandler.enable(file=self._fault_file, all_threads=False)

    def finished(self) -> None:
        self._write({"state": "finished"})

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, Terminated):
            where, collective = locate(traceback.extract_tb(exc.__traceback__))
            self._write({"state": "failed", "kind": "terminated", "message": "stopped by SIGTERM",
                         "where": where, "collective": collective})
        elif isinstance(exc, SystemExit):
            where, _ = locate(traceback.extract_tb(exc.__traceback__))
            self._write({"state": "failed", "kind": "exit", "message": f"exited with status {exc.code}",
                         "where": where, "collective": None})
        else:
            self._write({"state": "failed", **classify(exc)})

    def stuck(self) -> None:
        """The watchdog is ending this rank: record where its main thread was stuck."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        where, collective = locate(traceback.extract_stack(frame)) if frame is not None else ("?", None)
        self._write({"state": "failed", "kind": "terminated", "where": where, "collective": collective,
                     "message": "ended by its watchdog: told to stop, and stuck where Python could not stop it"})

    def _write(self, record: dict) -> None:
        record = {"rank": self.rank, "pid": os.getpid(), "time": time.time(), **record}
        try:
            atomic_write_text(record_path(self.directory, self.rank), json.dumps(record))
        except OSError:  # the launcher removed the directory: nobody is left to read it
            pass
