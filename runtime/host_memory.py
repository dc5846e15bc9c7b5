"""Host-memory allocation for training on the CPU: freed tensors go back to the operating system.

glibc's malloc serves a request of at least its mmap threshold from a mapping of its own,
returned to the kernel when freed; anything smaller comes from a heap that keeps freed chunks
resident. The threshold is dynamic: each freed mapping raises it to that mapping's size (up
to 32 MiB on 64-bit), so after the first step every activation-sized tensor comes from the
heap. Training frees and reallocates such tensors in every block while longer-lived ones
(checkpointed block inputs, gradient shards, buckets) land between them, so the heap cannot
shrink and the process's resident memory climbs well above the bytes in use: with activation
checkpointing, by several times the stored activations. The memory model counts tensors
(compiler/memory.py), and a plan's per-rank figure is a promise about the process, so on the
CPU the runtime fixes the threshold (mallopt M_MMAP_THRESHOLD, which also turns the dynamic
adjustment off): every tensor of at least `MMAP_THRESHOLD` bytes is its own mapping, and
resident memory follows the tensors alive. The cost is a page fault per fresh page of such
tensors (bench/host_memory.py measures it against the dynamic threshold).

Only glibc has these knobs; elsewhere (musl, macOS) nothing is changed and `fix_mmap_threshold`
says so. CUDA devices are untouched: their tensors are not in this heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MMAP_THRESHOLD = 1 << 20
"""Bytes from which a host allocation gets its own mapping. Below it, fragments are small next
to a transformer's activations; far below it, every small tensor would cost a system call."""
_M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number (malloc.h)."""


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to `threshold` for this process; False where the C library
    is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
