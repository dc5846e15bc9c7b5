"""The process seam: a free local port, signalling and stopping a child's process group, and the
tail of a child's log, for every launcher (`zeroplan train`, the tuner's children, bench).

Each launcher starts its children in a session of their own (`start_new_session=True`), so the
child's pid is also its process group's id and one signal reaches everything it started: its
ranks, their workers. Nothing outlives the command that started it (DESIGN, "Processes").

Torch-free, as lifeline.py: the tuner, which never imports torch, imports it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

TAIL_BYTES = 16384
"""How much of a log's end `tail` reads: enough for a traceback, bounded for a runaway log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: bound and released, so another
    process on a shared machine can take it first; a caller that must not fail retries."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_group(proc: subprocess.Popen, sig: int) -> bool:
    """Send `sig` to the process group `proc` leads; False when there is no such group left
    (ProcessLookupError) or it cannot be signalled (PermissionError, as for a zombie group on
    some systems): either way nothing of it is left to stop."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_group(proc: subprocess.Popen, *, grace_s: float, kill_wait_s: float | None = 5.0) -> int | None:
    """SIGTERM `proc`'s process group, so that it cleans up (`zeroplan train` stops its ranks),
    then SIGKILL the group when the leader outlasts `grace_s`, waiting `kill_wait_s` more (None:
    as long as it takes). Once the leader has exited, the group gets a SIGKILL too, so no worker
    it left behind survives it. A group already gone is left alone.

    The leader's exit status; None when it outlived both waits."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        if not signal_group(proc, sig):
            return proc.poll()
        try:
            code = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        signal_group(proc, signal.SIGKILL)
        return code
    return None


def tail(path: Path, *, lines: int) -> str:
    """The last `lines` lines of a log (of at most its last TAIL_BYTES), undecodable bytes
    replaced; "" when there is no log."""
    try:
        with Path(path).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
