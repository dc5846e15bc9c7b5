"""Pre-flight checks of NVMe swap paths, run by `initialize` before anything is built.

A missing directory, one this process cannot write, or a filesystem without room for every
rank's swap files is reported as a ConfigError naming the config key, before the first step
rather than as an I/O error halfway through one. Free space is what `statvfs` reports as
available to this user (f_bavail); the need is the preallocated size of the files of all
ranks of a node (they share its disks), summed over the targets on one filesystem. The
largest single file is also checked against this process's file-size limit (RLIMIT_FSIZE),
which would otherwise kill the rank with SIGXFSZ on the first write past it.
"""

from __future__ import annotations

import os
import resource
import tempfile
from dataclasses import dataclass

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.cluster import GiB

from .swap import align_up



@dataclass(frozen=True)
class SwapNeed:
    """Swap files one rank creates for one offload target."""

    key: str
    """Config key of the directory, e.g. zero_optimization.offload_optimizer.nvme_path."""
    path: str | None
    files: tuple[int, ...]
    """Bytes of each file, before block alignment."""

    @property
    def bytes(self) -> int:
        return sum(align_up(n) for n in self.files)


def check_swap_paths(needs: list[SwapNeed], *, ranks_per_node: int) -> None:
    """Raise one ConfigError listing every problem of every target's path."""
    problems, by_fs = [], {}
    for need in needs:
        problem = _usable(need)
        if problem is not None:
            problems.append(problem)
            continue
        by_fs.setdefault(os.stat(need.path).st_dev, []).append(need)
        problems += _file_size_limit(need)
    for group in by_fs.values():
        problems += _space(group, ranks_per_node=ranks_per_node)
    if problems:
        raise ConfigError(problems, source="plan (offload)")


def _usable(need: SwapNeed) -> Problem | None:
    fix = f"set {need.key} to an existing directory on a local NVMe disk that this user can write"
    if not need.path:
        return Problem(need.key, "is required with device 'nvme'", suggestion=fix)
    if not os.path.exists(need.path):
        return Problem(need.key, f"{need.path} does not exist", suggestion=f"create it (mkdir -p) or {fix}")
    if not os.path.isdir(need.path):
        return Problem(need.key, f"{need.path} is not a directory", suggestion=fix)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".zeroplan-check-", dir=need.path))
    except OSError as e:
        return Problem(need.key, f"{need.path} is not writable by this process (uid {os.geteuid()}): {e.strerror}",
                       suggestion=fix)
    return None


def _space(group: list[SwapNeed], *, ranks_per_node: int) -> list[Problem]:
    st = os.statvfs(group[0].path)
    free = st.f_bavail * st.f_frsize
    per_rank = sum(n.bytes for n in group)
    total = per_rank * ranks_per_node
    if total <= free:
        return []
    parts = " + ".join(f"{n.key.rsplit('.', 2)[-2]} {_size(n.bytes)}" for n in group)
    return [Problem(group[0].key, f"swap files need {_size(total)} ({total} bytes: {ranks_per_node} rank(s) per node "
                                  f"x {parts}) but {group[0].path} has {_size(free)} ({free} bytes) free",
                    suggestion="free space there, point nvme_path at a larger disk, shard over more ranks, "
                               "or offload to cpu")]


def _file_size_limit(need: SwapNeed) -> list[Problem]:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    largest = max((align_up(n) for n in need.files), default=0)
    if limit == resource.RLIM_INFINITY or largest <= limit:
        return []
    return [Problem(need.key, f"the largest swap file is {_size(largest)} ({largest} bytes) but this process may "
                              f"write files of at most {limit} bytes (RLIMIT_FSIZE) under {need.path}",
                    suggestion="raise the limit (ulimit -f unlimited) or shard over more ranks")]


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"
