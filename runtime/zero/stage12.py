"""ZeRO stages 1 and 2: optimizer state (1) and gradients (2) partitioned over dp ranks.

Each rank owns a 1/W chunk of every parameter (layout.py) and keeps the fp32 master weights,
optimizer states and (stage 2) gradients for that shard only. The model's parameters stay
whole on every rank.

Stage 1 phases (ZeRO paper, arXiv:1910.02054, P_os):
  1. gradients accumulate in a full fp32 buffer over the micro-batches of a step;
  2. at the boundary, reduce_scatter each `reduce_bucket_size` bucket as backward produces it
     (async: every bucket in flight with `overlap_comm`, else one; runtime/zero/comm.py), the
     last waited at the end of backward; each rank keeps its slice;
  3. step on the shard; all_gather the updated shard in `allgather_bucket_size` groups.
Stage 2 (P_os+g) reduce-scatters in phase 2 at every micro-batch and releases each
parameter's gradient once it is in a launched bucket, so no rank ever holds a full
gradient buffer; the shard slices are summed into the fp32 gradient shard.

With one micro-batch per step (gradient_accumulation_steps 1) stage 1's buffer would only copy
each gradient once before the same single reduce-scatter, so stage 1 then runs as stage 2 does
(`Stage1Direct`): the same collectives and arithmetic, without the whole-model fp32 buffer.
"""

from __future__ import annotations

import torch

from .base import ZeroStage
from .comm import gather_groups


class Stage1(ZeroStage):
    stage = 1

    def __init__(self, *, accumulation: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.accumulation = accumulation
        """Full fp32 gradient of the step so far, parameters back to back (unpadded)."""
        self._starts = []
        start = 0
        for slot in self.layout.slots:
            self._starts.append(start)
            start += slot.numel

    def _view(self, index: int) -> torch.Tensor:
        start = self._starts[index]
        return self.accumulation[start:start + self.layout.slots[index].numel]

    def on_grad(self, index: int, param: torch.Tensor) -> None:
        self._view(index).add_(param.grad.reshape(-1))
        param.grad = None
        if self.boundary:
            self.reducer.mark_ready(index)

    def source(self, index: int) -> torch.Tensor:
        return self._view(index)

    def zero_grad(self) -> None:
        self.accumulation.zero_()
        self.grad.zero_()

    def publish(self) -> None:
        self.gather_into_model(gather_groups(self.layout, self.allgather_bucket_size))


class Stage2(ZeroStage):
    stage = 2

    def on_grad(self, index: int, param: torch.Tensor) -> None:
        self.reducer.mark_ready(index)

    def source(self, index: int) -> torch.Tensor | None:
        param = self.layout.params[index]
        grad, param.grad = param.grad, None
        return grad

    def reduces_now(self) -> bool:
        return True

    def publish(self) -> None:
        self.gather_into_model(gather_groups(self.layout, self.allgather_bucket_size))


class Stage1Direct(Stage2):
    """Stage 1 with one micro-batch per step: stage 2's path (module docstring)."""

    stage = 1
