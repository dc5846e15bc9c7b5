"""ZeRO stage 0: plain data parallelism with bucketed all-reduce.

Every rank holds the whole fp32 master copy and optimizer state. Gradients accumulate in one
fp32 buffer over the micro-batches of a step (so bf16/fp16 gradients are not summed in low
precision); at the accumulation boundary each `reduce_bucket_size` bucket is all-reduced as
soon as backward has produced it.

Communication per step: all_reduce of every gradient bucket (phase 1 async when
`overlap_comm`, phase 2 waited at the end of backward); no parameter collective, the
updated master is copied into the model locally.
"""

from __future__ import annotations

import torch

from .base import ZeroStage


class Stage0(ZeroStage):
    stage = 0
    grad_norm_replicated = True

    def on_grad(self, index: int, param: torch.Tensor) -> None:
        slot = self.layout.slots[index]
        self.grad[slot.offset:slot.offset + slot.chunk].add_(param.grad.reshape(-1))
        param.grad = None
        if self.boundary:
            self.reducer.mark_ready(index)

    def source(self, index: int) -> torch.Tensor:
        slot = self.layout.slots[index]
        return self.grad[slot.offset:slot.offset + slot.chunk]

    def publish(self) -> None:
        for slot, p in zip(self.layout.slots, self.layout.params):
            p.data.copy_(self.master[slot.offset:slot.offset + slot.chunk].view(slot.shape))

    def full_parameters(self, *, read_master=None) -> list[torch.Tensor]:
        """Every parameter whole from the resident master (stage 0 is never offloaded)."""
        return [self.master[s.offset:s.offset + s.chunk].view(s.shape).clone() for s in self.layout.slots]
