"""`zeroplan probe`: measure this machine and describe it as a `ClusterSpec`.

Measurements (best of a few repetitions, after a warm-up):
1. matmul: an n x n product in fp32 and in bf16, 2n^3 FLOPs, with the threads one rank gets;
2. memory: a large tensor copy (read + write) on the device, and on the host;
3. host<->device: a pinned copy to the GPU (on cpu the host copy stands in);
4. collectives: all-reduce, all-gather and reduce-scatter across N local processes (gloo on
   cpu, NCCL on GPUs, same code): latency per ring step from a 1 KiB message, bandwidth per
   kind from larger ones (ring accounting, compiler/comm.py; steps = 2(n-1) or n-1). The kinds
   differ: gloo's all-gather and reduce-scatter run at a fraction of its all-reduce's rate;
5. start-up memory: what a rank holds once torch and its process group are up, before any
   model tensor (ClusterSpec.runtime_overhead_bytes, the memory model's `overhead`);
6. framework overhead: forward + backward of a tiny GPT with 1 and 9 blocks, per micro-step
   and per block (what small micro-batches pay more often);
7. disk: write (fsync) then read back a file under --path, its pages dropped from the cache
   first (posix_fadvise DONTNEED) so the read hits the disk.
One node is measured, so the inter-node figures repeat the intra-node ones (said in `notes`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zeroplan.schemas import ClusterRates, ClusterSpec

from . import lifeline, rundir
from .run_env import PARENT_ENV

MiB = 1 << 20


def best_seconds(fn, *, reps: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def matmul_flops(*, device: str, dtype: torch.dtype, n: int, reps: int = 3) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, reps=reps, sync=_sync(device))


def copy_bandwidth(*, device: str, nbytes: int, reps: int = 3) -> float:
    """Bytes/s of a copy, counting the read and the write."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src), reps=reps, sync=_sync(device))


def host_to_device_bandwidth(*, nbytes: int, reps: int = 3) -> float:
    src = torch.ones(nbytes // 4).pin_memory()
    dst = torch.empty(nbytes // 4, device="cuda")
    return nbytes / best_seconds(lambda: dst.copy_(src, non_blocking=True), reps=reps, sync=torch.cuda.synchronize)


def disk_bandwidth(path: Path, *, nbytes: int, chunk: int = 8 * MiB) -> tuple[float, float]:
    """(write, read) bytes/s of one file under `path`, written with fsync and read uncached."""
    block = os.urandom(chunk)
    fd, name = tempfile.mkstemp(prefix=".zeroplan-probe-", dir=path)
    lifeline.at_emergency_exit(lambda: Path(name).unlink(missing_ok=True))
    try:
        start = time.perf_counter()
        for _ in range(max(nbytes // chunk, 1)):
            os.write(fd, block)
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - start)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        start = time.perf_counter()
        while os.read(fd, chunk):
            pass
        read = nbytes / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(name)
    return write, read


def host_memory_bytes() -> int:
    """Physical memory, or the cgroup limit when lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _collective(op: str, numel: int, world: int, device: str):
    """A closure running one collective on a tensor of `numel` fp32 elements (gathered size)."""
    full = torch.ones(numel, device=device)
    shard = torch.ones(numel // world, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full)
    if op == "all_gather":
        return lambda: dist.all_gather_single(full, shard)
    return lambda: dist.reduce_scatter_single(shard, full)


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
SMALL_MESSAGE = 1024
"""Bytes of the message latency is measured with: far below where bandwidth matters."""


def rank_overhead(device: str) -> int:
    """Device bytes this rank holds with torch and its process group up and no model yet (after
    a first collective): resident memory on cpu; on cuda, the device memory in use (the
    context, cuBLAS and NCCL buffers), which the caching allocator's figures do not show."""
    dist.all_reduce(torch.ones(1, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return total - free
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _collective_worker(rank: int, world: int, device: str, store: str, sizes: list[int], reps: int,
                       out: str) -> None:
    lifeline.bind_to_parent()  # ends with the probe (`_spawn_bound`)
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:  # the share of cores a training rank gets (runtime.launch sets OMP_NUM_THREADS so)
        torch.set_num_threads(max(len(os.sched_getaffinity(0)) // world, 1))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world)
    try:
        overhead = rank_overhead(device)
        times = {op: [best_seconds(_collective(op, max(n // 4, world), world, device), reps=reps,
                                    sync=_sync(device)) for n in [SMALL_MESSAGE, *sizes]]
                 for op in COLLECTIVES} if world > 1 else {}
        if rank == 0:
            Path(out).write_text(json.dumps({"times": times, "overhead": overhead}))
    finally:
        dist.destroy_process_group()


def ring_steps(op: str, world: int) -> int:
    return (2 if op == "all_reduce" else 1) * (world - 1)


def _fit(sizes: list[int], seconds: list[float], *, op: str, world: int) -> tuple[float, float]:
    """(bandwidth, latency per ring step) of one op.

    `seconds[0]` is the small message: its time, over the ring steps, is the latency (launch,
    synchronisation, the library's own work per call). The bandwidth is the mean, over the
    larger sizes, of bytes sent (ring accounting) per second beyond that latency.
    """
    steps = ring_steps(op, world)
    factor = 2 if op == "all_reduce" else 1
    latency = seconds[0] / steps
    sent = [factor * (world - 1) * s / world for s in sizes]
    big = list(zip(sent, seconds[1:]))
    slopes = [(t - seconds[0]) / x for x, t in big if t > seconds[0]]
    slope = max(sum(slopes) / len(slopes), 1e-12) if slopes else seconds[-1] / sent[-1]
    return 1 / slope, latency


def _spawn_bound(worker, *, nprocs: int, args: tuple) -> None:
    """`mp.spawn(worker, args, nprocs)` with the workers bound to this process (lifeline.py):
    they end when it dies, and when it stops waiting for them (an exception: SIGTERM raised
    as lifeline.Terminated, Ctrl-C) it ends them, rather than have Python's exit wait for them."""
    before = os.environ.get(PARENT_ENV)
    os.environ.update(lifeline.child_env({}))  # the spawned workers inherit this environment
    try:
        context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    finally:
        os.environ.pop(PARENT_ENV)
        if before is not None:
            os.environ[PARENT_ENV] = before
    try:
        while not context.join():
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join()


def collective_rates(*, nproc: int, device: str, sizes: list[int],
                     reps: int = 3) -> tuple[dict[str, tuple[float, float]], int]:
    """({op: (bandwidth, latency per ring step)}, `rank_overhead` of rank 0) measured across
    `nproc` local processes (with one, no collectives: an empty dict)."""
    tmp = rundir.make_private_dir(rundir.default_root(), kind="probe")  # swept if this process is killed
    lifeline.at_emergency_exit(lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        out = tmp / "times.json"
        _spawn_bound(_collective_worker, nprocs=nproc,
                     args=(nproc, device, str(tmp / "store"), sizes, reps, str(out)))
        result = json.loads(out.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {op: _fit(sizes, t, op=op, world=nproc) for op, t in result["times"].items()}, result["overhead"]


def framework_overheads(*, device: str, reps: int = 20) -> tuple[float, float]:
    """(seconds per micro-step, seconds per transformer block) of fixed framework work.

    Forward + backward of the built-in GPT at a width, sequence and vocabulary too small for
    arithmetic to count (hidden 8, 4 tokens), with 1 and 9 blocks, a post-accumulate-grad hook
    on every parameter as the ZeRO stages register: the difference over 8 blocks is the cost
    of one block's dispatch, autograd nodes and hooks, the rest the per-micro-step cost. The
    two models are timed alternately, best of `reps` each, so a burst of load from other work
    on the machine does not land on one of them only.
    """
    from zeroplan.schemas import ModelSpec

    from .models import GPT

    def micro_step(layers: int):
        spec = ModelSpec(name="probe", layers=layers, hidden=8, heads=2, ffn=32, vocab=16, seq_len=4)
        model = GPT(spec).to(device)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda param: None)
        ids = torch.zeros(1, 4, dtype=torch.long, device=device)

        def run() -> None:
            model(ids, ids).backward()
            model.zero_grad(set_to_none=True)

        return run

    steps = {layers: micro_step(layers) for layers in (1, 9)}
    best = {layers: float("inf") for layers in steps}
    for _ in range(reps):
        for layers, run in steps.items():
            best[layers] = min(best[layers], best_seconds(run, reps=1, sync=_sync(device)))
    per_layer = max((best[9] - best[1]) / 8, 0.0)
    return max(best[1] - per_layer, 0.0), per_layer


def _sizes(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {"matmul": 4096, "copy": 1024 * MiB, "h2d": 256 * MiB, "disk": 1024 * MiB,
                "collective": [1 * MiB, 16 * MiB, 128 * MiB]}
    if quick:
        return {"matmul": 512, "copy": 64 * MiB, "disk": 32 * MiB, "collective": [64 << 10, 1 * MiB, 4 * MiB]}
    return {"matmul": 1024, "copy": 256 * MiB, "disk": 256 * MiB, "collective": [256 << 10, 4 * MiB, 32 * MiB]}


def probe_cluster(*, nproc: int | None = None, path: str | Path = ".", quick: bool = False) -> ClusterSpec:
    """Measure this node as `nproc` ranks and return its ClusterSpec (named `local`)."""
    if lifeline.bind_to_parent():  # started by the tuner (autotune/cluster.py): end with it
        lifeline.end_on_sigterm()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = len(os.sched_getaffinity(0))
    nproc = nproc or (torch.cuda.device_count() if device == "cuda" else cores)
    sizes, notes = _sizes(device, quick), []
    if device == "cpu":
        torch.set_num_threads(max(cores // nproc, 1))  # the share of cores one rank gets
    host_copy = copy_bandwidth(device="cpu", nbytes=sizes["copy"] // (4 if device == "cuda" else 1))
    device_copy = copy_bandwidth(device=device, nbytes=sizes["copy"]) if device == "cuda" else host_copy
    h2d = host_to_device_bandwidth(nbytes=sizes["h2d"]) if device == "cuda" else host_copy
    if device == "cpu":
        notes.append("cpu: device memory is host memory; host<->device copies are host copies")
    fp32 = matmul_flops(device=device, dtype=torch.float32, n=sizes["matmul"])
    bf16 = matmul_flops(device=device, dtype=torch.bfloat16, n=sizes["matmul"] // (2 if device == "cpu" else 1))
    per_op: dict[str, float] = {}
    rates, overhead = collective_rates(nproc=nproc, device=device, sizes=sizes["collective"])
    notes.append(f"start-up memory per rank (torch and the process group, no model): {overhead / MiB:.0f} MiB")
    if nproc > 1:
        bandwidth, latency = rates["all_reduce"]
        per_op = {op: bw for op, (bw, _) in rates.items() if op != "all_reduce"}
        notes.append("collectives (bandwidth B/s, latency s per ring step, from a "
                     f"{SMALL_MESSAGE}-byte message): " + ", ".join(
                         f"{op} {bw:.3g} / {lat:.3g}" for op, (bw, lat) in rates.items()))
    else:
        bandwidth, latency = device_copy / 2, 0.0
        notes.append("one rank: no collectives measured; bandwidth is half the copy rate")
    micro_step, per_layer = framework_overheads(device=device)
    notes.append(f"framework overhead: {micro_step * 1e3:.3g} ms per micro-step + {per_layer * 1e3:.3g} ms "
                 "per transformer block (forward + backward of a tiny GPT)")
    notes.append("one node measured: inter-node rates repeat the intra-node ones")
    path = Path(path)
    write, read = disk_bandwidth(path, nbytes=sizes["disk"])
    host = host_memory_bytes()
    memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else host
    return ClusterSpec(
        name="local", nnodes=1, nproc_per_node=nproc, device=device,
        device_name=torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({cores} cores)",
        device_memory_bytes=memory, host_memory_bytes=host, nvme_path=str(path.resolve()),
        nvme_free_bytes=shutil.disk_usage(path).free, rates_source="measured", notes=tuple(notes),
        runtime_overhead_bytes=overhead,
        rates=ClusterRates(matmul_flops_fp32=fp32, matmul_flops_16bit=bf16, memory_bandwidth=device_copy,
                           host_memory_bandwidth=host_copy / (nproc if device == "cpu" else 1),
                           intra_node_bandwidth=bandwidth, intra_node_latency=latency,
                           inter_node_bandwidth=bandwidth, inter_node_latency=latency,
                           host_to_device_bandwidth=h2d, disk_write_bandwidth=write, disk_read_bandwidth=read,
                           intra_node_collective_bandwidth=per_op, micro_step_overhead=micro_step,
                           layer_overhead=per_layer))
