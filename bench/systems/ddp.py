"""PyTorch DistributedDataParallel (ZeRO stage 0's peer): whole model, optimizer and gradients
on every rank; gradients all-reduced in 25 MB buckets during backward (DDP's defaults)."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..workload import Workload
from .base import System, accumulate_and_step, adamw


class DDP(System):
    name = "ddp"
    sharding = "stage 0"

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        self.workload = workload
        self.model = DistributedDataParallel(model)
        self.optimizer = adamw(self.model.parameters(), workload)

    def train_step(self, micro_batches):
        return accumulate_and_step(model=self.model, optimizer=self.optimizer, workload=self.workload,
                                   micro_batches=micro_batches, no_sync=self.model.no_sync)
