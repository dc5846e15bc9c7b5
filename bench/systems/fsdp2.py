"""FSDP2, `fully_shard` (ZeRO stage 3's peer): each transformer block and then the root module
sharded over a 1-D CPU device mesh on gloo; parameters are DTensors, all-gathered per block
before use and resharded after forward; gradients reduce-scattered per block."""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..workload import Workload
from .base import System, accumulate_and_step, adamw


class FSDP2(System):
    name = "fsdp2"
    sharding = "stage 3"

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        self.workload = workload
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        self.model = fully_shard(model, mesh=mesh)
        self.optimizer = adamw(self.model.parameters(), workload)

    def train_step(self, micro_batches):
        return accumulate_and_step(model=self.model, optimizer=self.optimizer, workload=self.workload,
                                   micro_batches=micro_batches, no_sync=self._no_sync)

    @contextlib.contextmanager
    def _no_sync(self):
        """FSDP2's gradient accumulation without reduce-scatter: sync off, back on for the last."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
