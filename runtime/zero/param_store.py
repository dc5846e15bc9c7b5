"""Where a ZeRO-3 rank keeps its parameter partition (its shard in the parameters' dtype).

Stage 3 reads a shard range just before it all-gathers those parameters and writes the
updated values after each optimizer step. `DeviceParams` keeps the partition on the compute
device (no parameter offload); runtime/offload adds host memory and NVMe files behind the same
calls, so the stage has one code path wherever the partition lives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ParamStore(ABC):
    """A rank's parameter partition: `numel` elements of `dtype`, read onto `device`."""

    reads_ahead = False
    """Whether `prefetch` does anything (stage 3 then looks further ahead for it)."""

    def __init__(self, *, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = numel, dtype, device

    @abstractmethod
    def read(self, offset: int, length: int) -> torch.Tensor:
        """Range [offset, offset + length) on `device`, valid until the next `write`."""

    @abstractmethod
    def write(self, offset: int, values: torch.Tensor) -> None:
        """Store updated values (any float dtype, any device) at [offset, offset + len(values))."""

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """A hint: these (offset, length) ranges are read soon."""

    def close(self) -> None:
        """Release files and buffers."""


class DeviceParams(ParamStore):
    """The partition as one tensor on the compute device; `shard` may be the fp32 master itself
    (fp32 training without offload), and then writing the master back is skipped."""

    def __init__(self, shard: torch.Tensor):
        super().__init__(numel=shard.numel(), dtype=shard.dtype, device=shard.device)
        self.shard = shard

    def read(self, offset: int, length: int) -> torch.Tensor:
        return self.shard[offset:offset + length]

    def write(self, offset: int, values: torch.Tensor) -> None:
        target = self.shard[offset:offset + values.numel()]
        if target.data_ptr() != values.data_ptr() or target.dtype != values.dtype:
            target.copy_(values)
