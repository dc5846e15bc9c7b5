"""DDP + torch's ZeroRedundancyOptimizer (ZeRO stage 1's peer): optimizer state sharded by
parameter over ranks; DDP all-reduces whole gradients, each rank steps the parameters it owns
and broadcasts them to the others."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from ..workload import Workload
from .base import System, accumulate_and_step


class ZeroOptimizer(System):
    name = "zero_optimizer"
    sharding = "stage 1"

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        self.workload = workload
        self.model = DistributedDataParallel(model)
        self.optimizer = ZeroRedundancyOptimizer(
            self.model.parameters(), optimizer_class=torch.optim.AdamW, lr=workload.lr, betas=workload.betas,
            eps=workload.eps, weight_decay=workload.weight_decay, fused=True)

    def train_step(self, micro_batches):
        # Gradients are whole and identical on every rank after DDP's all-reduce, so the local
        # clip_grad_norm_ in accumulate_and_step sees the global norm.
        return accumulate_and_step(model=self.model, optimizer=self.optimizer, workload=self.workload,
                                   micro_batches=micro_batches, no_sync=self.model.no_sync)
