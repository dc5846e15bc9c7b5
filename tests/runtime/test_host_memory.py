"""On the CPU the runtime fixes glibc's mmap threshold (runtime/host_memory.py), so a freed
activation-sized tensor goes back to the operating system instead of staying in malloc's heap.

Checked where it acts, in fresh processes (the setting is per process): after a 16 MiB tensor
is freed, glibc's dynamic threshold would serve a 4 MiB tensor from the heap; fixed, the 4 MiB
tensor is a mapping of its own (mallinfo2's mmapped bytes grow by it). How much resident memory
this saves in training, and what it costs, is measured by bench/host_memory.py and
bench/memory_model.py.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from zeroplan.runtime.host_memory import fix_mmap_threshold
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
torch.ones(4 << 20)  # freeing a 16 MiB mapping raises glibc's dynamic threshold past it
before = libc.mallinfo2().hblkhd
t = torch.ones(1 << 20)  # 4 MiB
print(libc.mallinfo2().hblkhd - before)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mmap thresholds are glibc's")


def _mapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_a_fixed_threshold_maps_each_large_tensor_on_its_own():
    assert _mapped_bytes("fixed") >= 4 << 20


def test_glibcs_dynamic_threshold_would_keep_it_in_the_heap():
    """The case above discriminates: without the fix the same tensor is not a mapping."""
    assert _mapped_bytes("heap") == 0
