"""A model of your own under zeroplan: a residual MLP classifier on synthetic data.

    zeroplan autotune examples/autotune_user.yaml --model examples/user_model.py:build --out out/user
    zeroplan train out/user/best_plan.json --model examples/user_model.py:build --steps 50

The contract (zeroplan/runtime/user_model.py): `build()` takes no arguments and returns
`(model, get_batch)`. The model's forward returns the loss; `get_batch(micro_batch_size,
index)` returns this rank's micro-batch number `index` in the form the forward takes (a dict
is called as `model(**batch)`). zeroplan reads the model's shape for its estimates from the
module: here 4 blocks of width 128.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INPUTS, CLASSES = 32, 10


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, *, width: int = 128, depth: int = 4):
        super().__init__()
        self.inp = nn.Linear(INPUTS, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(h), labels)


def build() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = ResidualMLP()
    teacher = torch.randn(INPUTS, CLASSES, generator=torch.Generator().manual_seed(1))

    def get_batch(micro_batch_size: int, index: int) -> dict[str, torch.Tensor]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        g = torch.Generator().manual_seed(index * world + rank)  # each rank its own samples
        x = torch.randn(micro_batch_size, INPUTS, generator=g)
        return {"x": x, "labels": (x @ teacher).argmax(-1)}

    return model, get_batch
