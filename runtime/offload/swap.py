"""Swap files for NVMe offload: a per-run directory, flat tensors on disk, one I/O thread.

- `SwapDir`: a fresh directory under `nvme_path` (mode 0700, created by this process and marked
  with it as owner: rundir.py), removed by `close()`, at interpreter exit (also after an
  exception ends the program), on SIGTERM (a tuner stopping a trial: where SIGTERM still has
  its default action it becomes SystemExit so the exit hooks run), and by the lifeline's
  watchdog when it ends a stuck rank (lifeline.py). A rank killed with SIGKILL cannot remove
  it: each new SwapDir first sweeps `nvme_path` for directories whose owner is dead.
- `SwapFile`: one flat tensor in a preallocated file (`posix_fallocate`, so a full disk is
  reported when the file is created, not halfway through a step), read and written by element
  range with pread/pwrite. Opened with O_DIRECT where the filesystem allows it, as DeepSpeed's
  aio does: I/O then goes to the disk instead of the page cache, so the memory that offload
  frees is not quietly taken back by cached file pages. O_DIRECT needs the buffer address, file
  offset and length aligned to the block size (`ALIGN`); the aligned calls take buffers from
  `aligned_empty` and ranges at multiples of `ALIGN` bytes, the general `read`/`write` go
  through an aligned bounce buffer (and read-modify-write the edge blocks).
- `IOThread`: a single background thread; jobs run in submission order, so a write-back
  queued before a read into the same buffer finishes first. pread/pwrite release the GIL.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .. import lifeline, rundir

ALIGN = 4096
"""Bytes: O_DIRECT alignment of buffers, offsets and lengths (the common logical block size)."""


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes` whose address is a multiple of ALIGN."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + nbytes]


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class SwapDir:
    """A per-run directory for one offload target's swap files."""

    def __init__(self, *, root: str | Path, label: str):
        rundir.sweep(root)
        self.path = rundir.make_private_dir(root, kind=label)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), ignore_errors=True)
        lifeline.at_emergency_exit(self._finalizer)
        _exit_on_sigterm()

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _exit_on_sigterm() -> None:
    """SIGTERM -> SystemExit(143), so atexit and finalizers remove the swap directories."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


_DIRECT_REFUSED: set[str] = set()


class SwapFile:
    """`numel` elements of `dtype` in the file `path`, created here and preallocated."""

    def __init__(self, path: Path, *, numel: int, dtype: torch.dtype, direct: bool = True):
        self.path, self.numel, self.dtype = Path(path), numel, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.data_bytes = numel * self.itemsize
        self.size = align_up(self.data_bytes)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = self._open()
        try:
            if self.size:
                os.posix_fallocate(self.fd, 0, self.size)
        except OSError:
            os.close(self.fd)
            raise

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        if self.direct:
            try:
                return os.open(self.path, flags | os.O_DIRECT, 0o600)
            except OSError as e:  # tmpfs and some network filesystems refuse O_DIRECT
                self.direct = False
                folder = str(self.path.parent.parent)
                if folder not in _DIRECT_REFUSED:
                    _DIRECT_REFUSED.add(folder)
                    warnings.warn(f"{folder}: O_DIRECT refused ({e.strerror}); swap files use the page cache",
                                  RuntimeWarning, stacklevel=3)
        return os.open(self.path, flags, 0o600)

    # -- aligned fast path: buffers from aligned_empty, offsets at multiples of ALIGN bytes ----
    def read_aligned(self, offset: int, out: torch.Tensor, length: int) -> None:
        """Elements [offset, offset + length) into the start of `out` (capacity for the range
        rounded up to ALIGN bytes)."""
        start, nbytes = self._range(offset, length)
        self._transfer(os.preadv, _bytes_of(out)[:nbytes], start)

    def write_aligned(self, offset: int, src: torch.Tensor, length: int) -> None:
        """Elements [offset, offset + length) from the start of `src`; bytes past the range up
        to the next ALIGN boundary are written too, so the range must end at an ALIGN boundary
        or at the end of the data."""
        start, nbytes = self._range(offset, length)
        if (start + length * self.itemsize) % ALIGN and start + length * self.itemsize != self.data_bytes:
            raise ValueError(f"{self.path}: aligned write of [{offset}, {offset + length}) ends mid-block")
        self._transfer(os.pwritev, _bytes_of(src)[:nbytes], start)

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        start = offset * self.itemsize
        if start % ALIGN or offset + length > self.numel:
            raise ValueError(f"{self.path}: range [{offset}, {offset + length}) is not block-aligned "
                             f"or exceeds {self.numel} elements")
        return start, min(align_up(length * self.itemsize), self.size - start)

    def _transfer(self, call, view: memoryview, position: int) -> None:
        done = 0
        while done < len(view):
            n = call(self.fd, [view[done:]], position + done)
            if n <= 0:
                raise OSError(f"{self.path}: short {'read' if call is os.preadv else 'write'} at byte {position + done}")
            done += n

    # -- general ranges, through an aligned bounce buffer ----------------------------------
    def read(self, offset: int, length: int) -> torch.Tensor:
        """Elements [offset, offset + length) as a new CPU tensor."""
        lo, hi = self._blocks(offset, length)
        buf = aligned_empty(hi - lo)
        self._transfer(os.preadv, _bytes_of(buf), lo)
        skip = offset * self.itemsize - lo
        return buf[skip:skip + length * self.itemsize].view(self.dtype)

    def write(self, offset: int, values: torch.Tensor) -> None:
        """Store `values` (cast to the file's dtype) at elements [offset, offset + len(values))."""
        length = values.numel()
        lo, hi = self._blocks(offset, length)
        start, end = offset * self.itemsize, (offset + length) * self.itemsize
        buf = aligned_empty(hi - lo)
        if start != lo:
            self._transfer(os.preadv, _bytes_of(buf[:ALIGN]), lo)
        if end != hi and end < self.data_bytes:
            self._transfer(os.preadv, _bytes_of(buf[-ALIGN:]), hi - ALIGN)
        buf[start - lo:end - lo].view(self.dtype).copy_(values.reshape(-1))
        self._transfer(os.pwritev, _bytes_of(buf), lo)

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or offset + length > self.numel:
            raise ValueError(f"{self.path}: range [{offset}, {offset + length}) exceeds {self.numel} elements")
        start = offset * self.itemsize
        return start - start % ALIGN, align_up(start + length * self.itemsize)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class IOThread:
    """One background thread running swap reads and writes in submission order."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
