"""Private per-run directories that a later run can tell are abandoned.

A run's swap files (offload/swap.py) and its ranks' failure reports (launch.py) live in a fresh
directory (mode 0700) marked with its owner: host, pid, and the process's start time (so a
reused pid is not mistaken for the owner). The owner removes the directory when it ends; one
killed with SIGKILL (kill -9, the out-of-memory killer) cannot, so every new run sweeps the
parent directory (`sweep`) and removes the directories whose owner is dead, as does
`zeroplan clean`. A directory of another host (a shared filesystem) or of another user is
never touched, nor one without its mark yet (being created).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

OWNER_FILE = ".zeroplan-owner.json"
PREFIX = "zeroplan-"
"""Every private directory's name starts with this (then its kind and the owner's pid)."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name start at field 3


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: int | None
    boot: str | None

    @classmethod
    def me(cls) -> "Owner":
        return cls(host=socket.gethostname(), pid=os.getpid(), started=_start_ticks(os.getpid()), boot=_boot_id())

    def alive(self) -> bool:
        """False only when certain: same host, and the process is gone (or the machine rebooted,
        or the pid now belongs to a process started at another time)."""
        if self.host != socket.gethostname():
            return True
        if self.boot is not None and self.boot != _boot_id():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        started = _start_ticks(self.pid)
        return self.started is None or started is None or started == self.started


def make_private_dir(root: str | Path, *, kind: str) -> Path:
    """A new directory `root/zeroplan-<kind>-<pid>-XXXX`, marked with this process as owner."""
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{os.getpid()}-", dir=root))
    (path / OWNER_FILE).write_text(json.dumps(asdict(Owner.me())))
    return path


def owner_of(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads((path / OWNER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def sweep(root: str | Path) -> list[Path]:
    """Remove the private directories under `root` whose owner is dead; the ones removed."""
    removed = []
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return removed
    for path in entries:
        if not path.name.startswith(PREFIX) or path.is_symlink() or not path.is_dir():
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        owner = owner_of(path)
        if owner is not None and not owner.alive():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def default_root() -> Path:
    """Where run directories without a configured place go (the system's temp directory)."""
    return Path(tempfile.gettempdir())
