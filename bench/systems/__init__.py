"""The benchmarked systems, one module each behind `System` (base.py).

| name              | sharding | what                                                        |
|-------------------|----------|-------------------------------------------------------------|
| `zeroplan-z0..z3` | stage N  | zeroplan's runtime with the compiled plan                   |
| `deepspeed-z0..z3`| stage N  | DeepSpeed with the plan's `ds_config` (if installed)        |
| `*-zN-offload-cpu`| stage N  | either, optimizer states and step on the CPU (stages 1-3)   |
| `zeroplan-zN-heap`| stage N  | zeroplan with glibc's dynamic mmap threshold (host_memory)  |
| `zeroplan-zN-thp` | stage N  | zeroplan with torch's THP_MEM_ALLOC_ENABLE=1 (huge pages)   |
| `zeroplan-zN-staged`| stage N | zeroplan publishing through gather buffers only (no in-place gathers) |
| `zeroplan-z3-peak`| stage 3  | zeroplan-z3 recording the peak before the optimizer states   |
| `zeroplan-z3-meta`| stage 3  | the same, the model built on meta and materialised shard-wise |
| `ddp`             | stage 0  | torch DistributedDataParallel                               |
| `zero_optimizer`  | stage 1  | DDP + torch.distributed.optim.ZeroRedundancyOptimizer       |
| `fsdp2`           | stage 3  | torch `fully_shard` over a CPU device mesh                  |
"""

from __future__ import annotations

from . import deepspeed, zeroplan
from .base import System
from .ddp import DDP
from .fsdp2 import FSDP2
from .zero_optimizer import ZeroOptimizer

SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in [*zeroplan.STAGES, *deepspeed.STAGES, DDP, ZeroOptimizer, FSDP2, *zeroplan.OFFLOAD, *deepspeed.OFFLOAD,
                *zeroplan.HEAP, *zeroplan.HUGE_PAGES, *zeroplan.STAGED, *zeroplan.META]
}
"""Every system by name, in the order tables list them."""

PEERS_OF_STAGE = {0: "ddp", 1: "zero_optimizer", 3: "fsdp2"}
"""The PyTorch-native peer of each ZeRO stage (stage 2 has none in PyTorch)."""


def get_system(name: str) -> type[System]:
    try:
        return SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}") from None


__all__ = ["PEERS_OF_STAGE", "SYSTEMS", "System", "get_system"]
