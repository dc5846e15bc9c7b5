"""Lifelines: every process zeroplan starts ends with the process that started it.

The chain is `zeroplan autotune` -> `zeroplan train` -> the torchrun agent -> the ranks. Each
launcher names itself in its child's environment (`child_env`: $ZEROPLAN_PARENT_PID), and
each child calls `bind_to_parent()` as it starts, which
- asks the kernel to send it SIGTERM when that parent dies (prctl PR_SET_PDEATHSIG, Linux),
  and ends it at once when the parent is already gone (it died between fork and this call);
- starts a watchdog thread that notices the parent's death by polling too (the kernel's
  signal follows the parent *thread* that forked, and does not exist off Linux) and, once the
  process has been told to end (parent gone, or SIGTERM with `end_on_sigterm`), gives it
  `grace_s` to end by itself, then runs the emergency clean-ups (`at_emergency_exit`: swap
  directories, the rank's failure report) and ends it with `os._exit`. A rank stuck in a
  collective or in native code, where Python signal handlers never run, ends within that bound.

So a kill -9 anywhere in the chain ends everything below it within a few GRACE_S, and nothing
outlives the command that started it (DESIGN, "Processes"). A plain `python train.py` or a
`nohup zeroplan train` started by hand has no $ZEROPLAN_PARENT_PID and is not bound.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from typing import Callable

from .run_env import PARENT_ENV

GRACE_S = 2.0
"""Seconds a rank told to end (SIGTERM, or its parent gone) has to end by itself before its
watchdog ends it. Each launcher above waits a little longer than the layer below it."""

AGENT_SHUTDOWN_S = int(GRACE_S) + 1
"""torchrun's --shutdown-timeout: SIGTERM to the ranks, then SIGKILL after this many seconds."""

LAUNCHER_STOP_S = AGENT_SHUTDOWN_S + 1.0
"""Seconds `zeroplan train` waits for the agent after SIGTERM before it kills its group."""

_POLL_S = 0.25
_PR_SET_PDEATHSIG = 1
_cleanups: list[Callable[[], None]] = []
_watchdog: "_Watchdog | None" = None


class Terminated(SystemExit):
    """SIGTERM turned into an exception (`end_on_sigterm`): `finally` blocks, atexit hooks and
    finalizers run; the status is 128 + SIGTERM, as if the signal had ended the process."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that must end with this process."""
    return {**env, PARENT_ENV: str(os.getpid())}


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def bind_to_parent(*, grace_s: float = GRACE_S) -> bool:
    """End this process with the parent $ZEROPLAN_PARENT_PID names; False when none is named.

    The variable is removed from this process's environment, so what this process starts is
    bound to it (through `child_env`), never to its parent.
    """
    value = os.environ.pop(PARENT_ENV, "")
    if not value.isdigit():
        return False
    parent = int(value)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(128 + signal.SIGTERM)
    _start_watchdog(parent=parent, grace_s=grace_s)
    return True


def end_on_sigterm() -> None:
    """SIGTERM raises `Terminated` in the main thread; the watchdog (started here if no parent
    was bound) ends the process `grace_s` later if the main thread is stuck where Python
    cannot raise it (a collective, native code). Call from the main thread."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)  # the C handler writes here at once
    _start_watchdog(parent=None, grace_s=GRACE_S).wake_fd = read_fd


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def exiting() -> None:
    """The process is on its way out (its work is done or has failed): a SIGTERM now (the
    launcher stopping the others) must not raise in an exit hook. Call from the main thread."""
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def at_emergency_exit(fn: Callable[[], None]) -> None:
    """Call `fn` (no arguments, must not block) when the watchdog ends the process."""
    _cleanups.append(fn)


def emergency_exit(status: int) -> None:
    """Run the emergency clean-ups, newest first, then end the process without unwinding."""
    for fn in reversed(_cleanups):
        try:
            fn()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
    sys.stderr.flush()
    os._exit(status)


def _start_watchdog(*, parent: int | None, grace_s: float) -> "_Watchdog":
    global _watchdog
    if _watchdog is None:
        _watchdog = _Watchdog(grace_s=grace_s)
        _watchdog.start()
    if parent is not None:
        _watchdog.parent = parent
        _watchdog.grace_s = grace_s
    return _watchdog


class _Watchdog(threading.Thread):
    """Polls the parent and the SIGTERM wake-up pipe; ends the process a grace period after
    either says it should end."""

    def __init__(self, *, grace_s: float):
        super().__init__(name="zeroplan-lifeline", daemon=True)
        self.parent: int | None = None
        self.grace_s = grace_s
        self.wake_fd: int | None = None

    def run(self) -> None:
        while not self._told_to_end():
            pass
        time.sleep(self.grace_s)
        emergency_exit(128 + signal.SIGTERM)

    def _told_to_end(self) -> bool:
        if self.parent is not None and os.getppid() != self.parent:
            return True
        if self.wake_fd is None:
            time.sleep(_POLL_S)
            return False
        ready, _, _ = select.select([self.wake_fd], [], [], _POLL_S)
        return bool(ready) and signal.SIGTERM in os.read(self.wake_fd, 64)
