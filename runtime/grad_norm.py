"""The gradient norm's arithmetic: the squared L2 norm of shard ranges, accumulated in float64
(an fp32 accumulation over tens of millions of elements drifts by ~0.3%).

Each `chunk` of elements is copied into one reused float64 scratch and squared-summed there
(a float64 dot product). A float64 copy of the whole gradient would cost 8 bytes per element,
and converting chunk by chunk into fresh tensors costs a page fault per page on the CPU, where
the runtime gives every tensor of 1 MiB or more its own mapping (host_memory.py): that made
the norm several times slower than the fp32 pass it replaces."""

from __future__ import annotations

import torch

CHUNK = 1 << 18
"""Elements per float64 pass (a 2 MiB scratch): small next to the gradient, large enough that
the per-chunk call overhead is negligible."""


def squared_norm_of_runs(flat: torch.Tensor, runs: list[tuple[int, int]], *, chunk: int = CHUNK) -> torch.Tensor:
    """Sum of squares of `flat[lo:hi]` over `runs`, a 0-d float64 tensor on `flat`'s device."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    longest = max((hi - lo for lo, hi in runs), default=0)
    if longest == 0:
        return total
    scratch = torch.empty(min(chunk, longest), dtype=torch.float64, device=flat.device)
    for lo, hi in runs:
        for part in flat[lo:hi].split(chunk):
            wide = scratch[:part.numel()]
            wide.copy_(part)
            total += torch.dot(wide, wide)
    return total
