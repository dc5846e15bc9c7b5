"""Finding a run's processes in tests of process hygiene, whatever their session or parent.

A test starts its command with $ZP_TEST_RUN set to a fresh mark; every process below it
inherits the variable, so `processes_with(mark)` finds them all, also after their launcher is
gone (reparented to init) or in sessions of their own.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARK = "ZP_TEST_RUN"


def processes_with(mark: str, *, argv_has: str = "") -> list[int]:
    """Pids of the live processes whose environment carries `mark` (whatever their session),
    and whose command line contains `argv_has`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if f"{MARK}={mark}".encode() in env and state != "Z" and argv_has.encode() in argv:
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout_s: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def kill_survivors(mark: str) -> None:
    """SIGKILL what is left of a run (a test's clean-up after a failed assertion)."""
    for pid in processes_with(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
