"""The gradient norm's arithmetic: the squared L2 norm of shard ranges, accumulated in float64
one 1M-element chunk at a time (an fp32 accumulation over tens of millions of elements drifts by
~0.3%; a float64 copy of the whole gradient costs a pass and 8 bytes per element)."""

from __future__ import annotations

import torch


def squared_norm(flat: torch.Tensor, *, chunk: int = 1 << 20) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for part in flat.split(chunk):
        total += torch.linalg.vector_norm(part, dtype=torch.float64).square()
    return total


def squared_norm_of_runs(flat: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for lo, hi in runs:
        total += squared_norm(flat[lo:hi])
    return total
