"""ZeRO-3 parameter offload: the rank's partition kept off the compute device.

- `HostParams` (offload_param cpu): the partition in host memory (pinned when CUDA is present
  and `pin_memory` asks for it); a gather reads its range onto the device (a non-blocking
  copy on CUDA; the range itself on a CPU-only machine, where host and device are one).
- `NvmeParams` (offload_param nvme): the partition in a swap file. Stage 3 asks for the
  ranges of the modules beyond its gather window (`prefetch`); the I/O thread reads them into
  host buffers, at most `buffer_count` ahead, and the gather takes the buffer when its turn
  comes, waiting only if the read has not finished. Step writes go to the file; any read
  still queued is finished and dropped first, so no gather sends a value from before the step.
  `max_in_cpu` is not used: with nvme the whole partition lives in the file.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from ..zero.param_store import ParamStore
from .swap import IOThread, SwapDir, SwapFile


class HostParams(ParamStore):
    def __init__(self, *, host: torch.Tensor, device: torch.device):
        super().__init__(numel=host.numel(), dtype=host.dtype, device=device)
        self.host = host

    def read(self, offset, length) -> torch.Tensor:
        return self.host[offset:offset + length].to(self.device, non_blocking=self.host.is_pinned())

    def write(self, offset, values) -> None:
        target = self.host[offset:offset + values.numel()]
        if target.data_ptr() != values.data_ptr() or target.dtype != values.dtype:
            target.copy_(values)


class NvmeParams(ParamStore):
    reads_ahead = True

    def __init__(self, *, folder: SwapDir, rank: int, numel: int, dtype: torch.dtype, device: torch.device,
                 buffer_count: int, pin: bool):
        super().__init__(numel=numel, dtype=dtype, device=device)
        self.folder, self.buffer_count, self.pin = folder, buffer_count, pin
        self.file = SwapFile(folder.path / f"rank{rank:05d}.params.swp", numel=numel, dtype=dtype)
        self.io = IOThread("zeroplan-param-swap")
        self._ahead: dict[tuple[int, int], Future] = {}
        self.reads = {"prefetched": 0, "waited": 0, "direct": 0}
        """How gathers got their partitions: read ahead and ready, read ahead but waited for, or
        read on demand (for tests and tuning of `buffer_count`)."""

    def prefetch(self, spans) -> None:
        for span in spans:
            if len(self._ahead) >= self.buffer_count:
                return
            if span not in self._ahead:
                self._ahead[span] = self.io.submit(self.file.read, *span)

    def read(self, offset, length) -> torch.Tensor:
        ahead = self._take(offset, length)
        if ahead is None:
            self.reads["direct"] += 1
            values = self.file.read(offset, length)
        else:
            self.reads["prefetched" if ahead.done() else "waited"] += 1
            values = ahead.result()
        if self.device.type != "cpu":
            staged = torch.empty(values.shape, dtype=values.dtype, pin_memory=self.pin).copy_(values)
            return staged.to(self.device, non_blocking=self.pin)
        return values

    def _take(self, offset: int, length: int) -> Future | None:
        """The read-ahead of exactly this range; read-aheads inside it are dropped (the gather
        was cut differently from the prefetch), so they do not hold buffers until the step."""
        ahead = self._ahead.pop((offset, length), None)
        for span in [s for s in self._ahead if offset <= s[0] and s[0] + s[1] <= offset + length]:
            self._ahead.pop(span).result()
        return ahead

    def write(self, offset, values) -> None:
        self._drop_ahead()
        self.file.write(offset, values.detach().to("cpu"))

    def _drop_ahead(self) -> None:
        for future in self._ahead.values():
            future.result()
        self._ahead.clear()

    def close(self) -> None:
        if self.file.fd < 0:
            return
        self._drop_ahead()
        self.io.close()
        self.file.close()
        self.folder.close()
