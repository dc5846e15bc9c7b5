"""The memory model's model states are what `initialize` allocates: for the small preset at
ZeRO 0-3 in fp32 and bf16 (one rank, so shards are whole and nothing else differs), the bytes
malloc holds after `initialize` less those before the model was built equal the plan's
parameters + gradients + optimizer states + master weights within 2%.

Measured with glibc's mallinfo2 (bytes in use in the heap plus mmapped), in a fresh process
whose mmap threshold is fixed as the runtime fixes it on the CPU (runtime/host_memory.py), so
what the model built and then released is not counted. The optimizer's state exists from
`initialize` on (the flat-shard optimizers allocate it there), so no step is needed."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, gc, json, os, socket, sys, warnings
import torch
from zeroplan.runtime import initialize
from zeroplan.runtime.host_memory import fix_mmap_threshold
from zeroplan.runtime.models import GPT
from zeroplan.compiler import compile as compile_config, estimate_memory
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ConfigWarning, validate_config

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def in_use():
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd

assert fix_mmap_threshold()
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.set_num_threads(1)

def plan_for(spec, *, stage, dtype):
    data = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
            "bf16": {"enabled": dtype == "bf16"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return compile_config(validate_config(data), spec, CLUSTER_PRESETS["cpu"], nproc_per_node=1)

# Not measured: the process group and the first initialize's one-off allocations (kernels, the
# optimizer extension) are the runtime's overhead category, not model states.
initialize(GPT(MODEL_PRESETS["tiny"]), plan=plan_for(MODEL_PRESETS["tiny"], stage=0, dtype="fp32")).close()
model_spec = MODEL_PRESETS["small"]
out = {}
for dtype in ("fp32", "bf16"):
    for stage in range(4):
        plan = plan_for(model_spec, stage=stage, dtype=dtype)
        gc.collect()
        before = in_use()
        engine = initialize(GPT(model_spec), plan=plan)
        measured = in_use() - before
        predicted = estimate_memory(plan, model_spec).device
        states = sum(predicted[k] for k in ("parameters", "gradients", "optimizer_states", "master_weights"))
        out[f"{dtype}-z{stage}"] = [measured, states]
        engine.close()
        del engine
        gc.collect()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured() -> dict[str, list[int]]:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallinfo2 is glibc's")
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{d}-z{s}" for d in ("fp32", "bf16") for s in range(4)])
def test_model_states_are_what_initialize_allocates(measured, case):
    got, predicted = measured[case]
    assert abs(got - predicted) <= 0.02 * predicted, f"{case}: allocated {got >> 20} MiB, predicted {predicted >> 20} MiB"
