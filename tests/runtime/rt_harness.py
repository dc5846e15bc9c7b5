"""The distributed test harness: run one function on N gloo ranks in fresh processes.

`run_distributed(fn, world_size, *args)` spawns N processes (a free TCP port on 127.0.0.1),
initialises a gloo group in each (one intra-op thread per rank), runs `fn(*args)` on every
rank and returns the per-rank results in rank order. A failure on any rank is re-raised here
with that rank's traceback; a rank that does not finish within `timeout` seconds fails the
test instead of hanging it. Process groups are destroyed in every rank before it exits.
`fn` must be importable (a module-level function).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from datetime import timedelta

from zeroplan.runtime.procs import free_port


def _worker(rank: int, world_size: int, port: int, timeout: float, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        results.put((rank, "ok", pickle.dumps(fn(*args))))  # bytes: no shared-memory fds
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        gc.collect()  # engines are gone: the group is destructed here, not at interpreter exit
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """`fn(*args)` on `world_size` gloo ranks; the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, timeout, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s")
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise AssertionError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]
