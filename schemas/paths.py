"""Checks of the output paths a command is given: a ConfigError naming the option and what is
wrong (a directory where a file goes, a file where a directory goes, a symlink loop, a
read-only place), before anything runs, never a traceback from deep inside a run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError, Problem


def writable_dir(path: str | Path, *, key: str) -> Path:
    """`path` as a directory this process can write files in, created if missing."""
    path = Path(path)
    why = _unwritable_dir(path)
    if why:
        raise ConfigError(Problem(key, f"{path} {why}", given=str(path),
                                  suggestion="give a directory you can write to"))
    return path


def writable_file(path: str | Path, *, key: str) -> Path:
    """`path` as a file this process can write (its directory created if missing; the file itself
    is created empty if it does not exist)."""
    path = Path(path)
    if path.is_dir():
        why = "is a directory"
    else:
        folder = _unwritable_dir(path.parent)
        why = f"cannot be created: its directory {path.parent} {folder}" if folder else _unwritable_file(path)
    if why:
        raise ConfigError(Problem(key, f"{path} {why}", given=str(path),
                                  suggestion="give a file path you can write to"))
    return path


def _unwritable_file(path: Path) -> str:
    try:
        with path.open("a"):
            return ""
    except OSError as e:
        return f"cannot be written: {e.strerror or e}"


def _unwritable_dir(path: Path) -> str:
    """Why no file can be created in `path` (created if missing), or ""."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".zeroplan-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        return "is a symlink that leads nowhere (or to itself)" if path.is_symlink() else "is not a directory"
    except OSError as e:
        return f"cannot be written: {e.strerror or e}"
    return ""
