"""ZeRO stage 0: plain data parallelism with bucketed all-reduce.

Every rank holds the whole fp32 master and optimizer state. In fp32 training the parameters
are views of the master (as DDP's parameters are its optimizer's): no second copy, and
`publish` has nothing to copy; in bf16/fp16 the master is an fp32 copy. Gradients accumulate in one
fp32 buffer over the micro-batches of a step (so bf16/fp16 gradients are not summed in low
precision); at the accumulation boundary each `reduce_bucket_size` bucket is all-reduced as
soon as backward has produced it.

Communication per step: all_reduce of every gradient bucket; reducing in fp32, each bucket is
its range of the gradient buffer, all-reduced in place and asynchronously during backward
(phase 1; no buffer is held, so overlap costs nothing: BucketReducer's `in_place`), waited at
the end of backward (phase 2); in bf16/fp16 through a bucket copy, async when `overlap_comm`.
No parameter collective: the updated master is copied into the model locally.
"""

from __future__ import annotations

import torch

from .base import ZeroStage


class Stage0(ZeroStage):
    stage = 0
    grad_norm_replicated = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.param_dtype == self.master.dtype:  # the parameters become the master's views
            for slot, p in zip(self.layout.slots, self.layout.params):
                p.data = self._master_view(slot)

    def _master_view(self, slot) -> torch.Tensor:
        return self.master[slot.offset:slot.offset + slot.chunk].view(slot.shape)

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
        """The master into the parameters, where they are not its views (bf16/fp16, or a
        parameter whose storage was replaced since, e.g. by `module.to()`)."""
        for slot, p in zip(self.layout.slots, self.layout.params):
            view = self._master_view(slot)
            if p.data.data_ptr() != view.data_ptr():
                p.data.copy_(view)

    def full_parameters(self, *, read_master=None) -> list[torch.Tensor]:
        """Every parameter whole from the resident master (stage 0 is never offloaded)."""
        return [self._master_view(s).clone() for s in self.layout.slots]
