"""NVMe optimizer offload: master and optimizer state in swap files, stepped tile by tile.

ZeRO-Infinity (arXiv:2104.07857, section 5) keeps the fp32 master and the Adam moments on
NVMe and streams them through host memory one sub-group at a time. Here a rank's shard is cut
into tiles of `tile` elements (`zero_optimization.sub_group_size`, capped by the swap
`buffer_size`, rounded to whole I/O blocks); `buffer_count` ring buffers each hold one
tile's master, exp_avg and exp_avg_sq. Step phases:

  1. queue reads of the first `buffer_count` tiles on the I/O thread;
  2. per tile i: wait for its read; copy its gradient range to the host (a slice on a
     CPU-only machine); run the optimizer kernel on the tile's part of each run (cpu_adam by
     the plan; optim_runs.py); hand the updated master range to the stage (`write_params`: the
     model's own parameter chunks at stages 1-2, the partition at stage 3); queue the tile's
     write-back, then the read of tile i + buffer_count into the same buffer (the thread runs
     jobs in order, so the write-back finishes first);
  3. wait for the last write-backs.
With two or more buffers the disk reads and writes of neighbouring tiles overlap the kernel.

What stays resident per rank: the ring buffers (buffer_count x tile x 12 bytes), the fp32
gradient shard (the stage reduces into it) and the parameters the stage publishes from. For
fp32 training at stages 1-2 those parameters are the model itself, which every rank holds
whole anyway, so none of the 12 bytes per shard element of master and moments stays resident.
At stage 3 the partition in the parameters' dtype stays (or goes to NVMe too with
`offload_param`).
"""

from __future__ import annotations

import torch

from ..optim_runs import update_runs
from .master import MASTER, MasterOptimizer, check_state
from .swap import ALIGN, IOThread, SwapDir, SwapFile, aligned_empty


def tile_elements(*, sub_group_size: int, buffer_size: int, numel: int) -> int:
    """Elements per swap tile: the sub-group, capped by the buffer and the shard, in whole blocks."""
    per_block = ALIGN // 4
    tile = max(1, min(sub_group_size, buffer_size, numel))
    return -(-tile // per_block) * per_block


class SwapState:
    """One rank's master and element-wise optimizer state in files of a `SwapDir`."""

    def __init__(self, *, folder: SwapDir, rank: int, numel: int, names: tuple[str, ...], direct: bool = True):
        self.folder, self.numel, self.names = folder, numel, (MASTER, *names)
        self.files: dict[str, SwapFile] = {}
        for name in self.names:
            self.files[name] = SwapFile(folder.path / f"rank{rank:05d}.{name}.swp", numel=numel,
                                        dtype=torch.float32, direct=direct)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.folder.close()


class NvmeMaster(MasterOptimizer):
    def __init__(self, *, state: SwapState, tile: int, buffers: int, pin: bool, **kwargs):
        super().__init__(**kwargs)
        self.state, self.tile = state, tile
        self.tiles = [(lo, min(lo + tile, self.numel)) for lo in range(0, self.numel, tile)]
        width = len(state.names)
        count = max(1, min(buffers, len(self.tiles)))
        self.ring = [aligned_empty(width * tile * 4, pin=pin).view(torch.float32).view(width, tile)
                     for _ in range(count)]
        self._grad_host = None if self.device.type == "cpu" else aligned_empty(tile * 4, pin=pin).view(torch.float32)
        self.io = IOThread("zeroplan-swap")

    # -- I/O of one tile ------------------------------------------------------------------------
    def _read(self, index: int, buf: torch.Tensor) -> None:
        lo, hi = self.tiles[index]
        for row, name in enumerate(self.state.names):
            self.state.files[name].read_aligned(lo, buf[row], hi - lo)

    def _write(self, index: int, buf: torch.Tensor) -> None:
        lo, hi = self.tiles[index]
        for row, name in enumerate(self.state.names):
            self.state.files[name].write_aligned(lo, buf[row], hi - lo)

    # -- the step ----------------------------------------------------------------------------
    def step(self, *, grad, runs, keep=()) -> None:
        ring, n = self.ring, len(self.tiles)
        reads = {i: self.io.submit(self._read, i, ring[i % len(ring)]) for i in range(min(len(ring), n))}
        writes = []
        self.optimizer.begin_step()
        for i, (lo, hi) in enumerate(self.tiles):
            buf = ring[i % len(ring)]
            reads.pop(i).result()
            master = buf[0, :hi - lo]
            state = {name: buf[row, :hi - lo] for row, name in enumerate(self.state.names) if row}
            update_runs(self.optimizer, param=master, grad=self._grad_tile(grad, lo, hi), state=state, runs=runs,
                        keep=keep, offset=lo)
            self.zero.write_params(lo, master)
            writes.append(self.io.submit(self._write, i, buf))
            if i + len(ring) < n:
                reads[i + len(ring)] = self.io.submit(self._read, i + len(ring), buf)
        for w in writes:
            w.result()
        self.optimizer.end_step()

    def _grad_tile(self, grad: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if self._grad_host is None:
            return grad[lo:hi]
        host = self._grad_host[:hi - lo]
        host.copy_(grad[lo:hi], non_blocking=host.is_pinned())
        torch.cuda.current_stream(grad.device).synchronize()
        return host

    # -- whole-shard access: checkpoints and consolidation --------------------------------------
    def read_master(self, offset, length) -> torch.Tensor:
        return self.state.files[MASTER].read(offset, length).to(self.device)

    def write_master(self, offset, values) -> None:
        self.state.files[MASTER].write(offset, values.cpu())
        self.zero.write_params(offset, values)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Read the files tile by tile into whole tensors (the checkpoint writer needs them)."""
        out = {name: torch.empty(self.numel, dtype=torch.float32) for name in self.state.names}
        buf = self.ring[0]
        for i, (lo, hi) in enumerate(self.tiles):
            self._read(i, buf)
            for row, name in enumerate(self.state.names):
                out[name][lo:hi] = buf[row, :hi - lo]
        return {MASTER: out.pop(MASTER), **{f"optim.{k}": v for k, v in out.items()},
                **{f"optim.{k}": v for k, v in self.optimizer.counters().items()}}

    def load_checkpoint_tensors(self, tensors) -> None:
        check_state(self.optimizer, self.numel, tensors)
        buf = self.ring[0]
        for i, (lo, hi) in enumerate(self.tiles):
            for row, name in enumerate(self.state.names):
                buf[row, :hi - lo] = tensors[name if name == MASTER else f"optim.{name}"][lo:hi]
            self._write(i, buf)
            self.zero.write_params(lo, buf[0, :hi - lo])
        for name, t in self.optimizer.counters().items():
            t.copy_(tensors[f"optim.{name}"])

    def close(self) -> None:
        self.io.close()
        self.state.close()


def write_initial_master(*, state: SwapState, master_range, tile: int) -> None:
    """Fill the master file from `master_range(lo, hi)` (fp32 CPU) one tile at a time, so the
    whole master shard is never in memory; the moment files start as zeros (preallocated)."""
    buf = aligned_empty(tile * 4).view(torch.float32)
    for lo in range(0, state.numel, tile):
        hi = min(lo + tile, state.numel)
        buf[:hi - lo] = master_range(lo, hi)
        state.files[MASTER].write_aligned(lo, buf, hi - lo)


__all__ = ["NvmeMaster", "SwapState", "tile_elements", "write_initial_master"]
