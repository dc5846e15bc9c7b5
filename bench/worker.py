"""One rank of one measurement: `python -m bench.worker SYSTEM WORKLOAD_JSON OUT_JSON`.

Started by bench.launch in a fresh process per rank (the environment torchrun would set:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), so every figure below belongs to
this system alone:
- step times on this rank (wall clock of `train_step`; collectives keep the ranks in step);
- the loss of every step, averaged over ranks (outside the timed region);
- resident memory: `baseline` after torch, the process group and the system's imports
  (before the model exists), `after_setup` once the system has wrapped the model and built
  its optimizer, `peak`, this process's high-water mark, start-up included, and the
  high-water mark after each step (`peak_by_step`: says which phase set the peak, set-up or
  the first or a later step).

The peak is the kernel's VmHWM (/proc/self/status), not getrusage's ru_maxrss: Linux carries
ru_maxrss across fork and exec (the forked copy of the launcher's memory counts), so a rank
started by a launcher that has itself touched 2 GiB reports at least 2 GiB. VmHWM is the
high-water mark of this process image alone; ru_maxrss is recorded beside it for reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def current_rss() -> int:
    """Bytes resident now (/proc/self/statm, second field, in pages)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Bytes at this process image's high-water mark (VmHWM, in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def ru_maxrss() -> int:
    """getrusage's peak (KiB on Linux); includes memory inherited from the launcher (see above)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def profiled_step(step, *, top: int = 25) -> dict:
    """One call of `step` under torch.profiler (CPU): its wall time and the operators that took
    the most self time, summed over threads (gloo's collectives run on threads of their own)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_ms": wall * 1e3, "self_ms_total": sum(e.self_cpu_time_total for e in ops) / 1e3,
            "ops": [{"name": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in ops[:top]]}


def run(system_name: str, workload_json: str) -> dict:
    from zeroplan.runtime.models import GPT, MarkovChainData

    from .systems import get_system
    from .workload import Workload

    workload = Workload.from_json(workload_json)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    system = get_system(system_name)()
    baseline = current_rss()
    torch.manual_seed(workload.seed)  # the same initial weights in every rank of every system
    with torch.device("meta") if system.build_on_meta else contextlib.nullcontext():
        model = GPT(workload.spec)
    system.setup(model=model, workload=workload)
    after_setup, setup_peak = current_rss(), peak_rss()
    data = MarkovChainData(vocab=workload.spec.vocab, seq_len=workload.spec.seq_len, seed=workload.seed)

    def batches(step: int):
        return data.micro_batches(step=step, global_batch_size=workload.global_batch_size,
                                  micro_batch_size=workload.micro_batch_size, dp=world, dp_rank=rank)

    times, losses, peaks = [], [], []
    for step in range(workload.steps):
        micro_batches = batches(step)
        t0 = time.perf_counter()
        loss = system.train_step(micro_batches)
        times.append(time.perf_counter() - t0)
        peaks.append(peak_rss())
        mean = loss.detach().float().reshape(1).clone()
        dist.all_reduce(mean)
        losses.append(float(mean.item()) / world)
    profile = None
    if workload.profile:
        micro_batches = batches(workload.steps)
        profile = profiled_step(lambda: system.train_step(micro_batches))
    own = system.results()
    system.close()
    return {"system": system_name, "rank": rank, "world_size": world, "step_times_s": times, "losses": losses,
            "baseline_rss_bytes": baseline, "after_setup_rss_bytes": after_setup, "peak_rss_bytes": peak_rss(),
            "setup_peak_rss_bytes": setup_peak, "peak_by_step": peaks,
            "ru_maxrss_bytes": ru_maxrss(), **({"profile": profile} if profile else {}), **own}


def main(argv: list[str]) -> int:
    system_name, workload_json, out = argv
    try:
        result = run(system_name, workload_json)
    except BaseException:
        result = {"system": system_name, "rank": int(os.environ.get("RANK", -1)), "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
