"""Markdown pieces every results file shares: the machine, the command, tables."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from zeroplan.runtime.environment import cpu_flags, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def machine_lines(peers: dict[str, str]) -> list[str]:
    """Bullet lines: CPU, cores, memory, Python/torch, and each peer's version or why it is absent."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    vector = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))) or "no AVX"
    lines = [f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible, {mem:.0f} GiB memory; "
             "shared with other work, so timings carry noise",
             f"- vector units: {vector}",
             f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"]
    lines += [f"- {name}: {version}" for name, version in peers.items()]
    return lines


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *,
          right: Sequence[bool] | None = None) -> list[str]:
    """A GitHub markdown table; `right[i]` right-aligns column i (numbers)."""
    right = right or [False] * len(headers)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def result_path(name: str) -> Path:
    return RESULTS / f"{name}-{dt.date.today().isoformat()}.md"


def write(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
