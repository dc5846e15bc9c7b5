"""`zeroplan probe`: measure this machine and describe it as a `ClusterSpec`.

Measurements (best of a few repetitions, after a warm-up):
1. matmul: an n x n product in fp32 and in bf16, 2n^3 FLOPs, with the threads one rank gets;
2. memory: a large tensor copy (read + write) on the device, and on the host;
3. host<->device: a pinned copy to the GPU (on cpu the host copy stands in);
4. collectives: all-reduce, all-gather and reduce-scatter at several sizes across N local
   processes (gloo on cpu, NCCL on GPUs, same code), fitted to t = latency * steps + bytes / bw
   with ring accounting (compiler/comm.py), steps = 2(n-1) or n-1;
5. disk: write (fsync) then read back a file under --path, its pages dropped from the cache
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

MiB = 1 << 20


def _best_seconds(fn, *, reps: int, sync) -> float:
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
    return 2 * n**3 / _best_seconds(lambda: a @ b, reps=reps, sync=_sync(device))


def copy_bandwidth(*, device: str, nbytes: int, reps: int = 3) -> float:
    """Bytes/s of a copy, counting the read and the write."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), reps=reps, sync=_sync(device))


def host_to_device_bandwidth(*, nbytes: int, reps: int = 3) -> float:
    src = torch.ones(nbytes // 4).pin_memory()
    dst = torch.empty(nbytes // 4, device="cuda")
    return nbytes / _best_seconds(lambda: dst.copy_(src, non_blocking=True), reps=reps, sync=torch.cuda.synchronize)


def disk_bandwidth(path: Path, *, nbytes: int, chunk: int = 8 * MiB) -> tuple[float, float]:
    """(write, read) bytes/s of one file under `path`, written with fsync and read uncached."""
    block = os.urandom(chunk)
    fd, name = tempfile.mkstemp(prefix=".zeroplan-probe-", dir=path)
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


def _collective_worker(rank: int, world: int, device: str, store: str, sizes: list[int], out: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world)
    try:
        times = {op: [_best_seconds(_collective(op, n // 4, world, device), reps=3, sync=_sync(device))
                      for n in sizes] for op in ("all_reduce", "all_gather", "reduce_scatter")}
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def _fit(sizes: list[int], seconds: list[float], *, op: str, world: int) -> tuple[float, float]:
    """(bandwidth, latency per ring step) from a least-squares line through (bytes sent, seconds)."""
    factor = 2 if op == "all_reduce" else 1
    sent = [factor * (world - 1) * s / world for s in sizes]
    mean_x, mean_y = sum(sent) / len(sent), sum(seconds) / len(seconds)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(sent, seconds))
             / sum((x - mean_x) ** 2 for x in sent))
    slope = slope if slope > 0 else seconds[-1] / sent[-1]
    intercept = max(mean_y - slope * mean_x, 0.0)
    return 1 / slope, intercept / (factor * (world - 1))


def collective_rates(*, nproc: int, device: str, sizes: list[int]) -> dict[str, tuple[float, float]]:
    """{op: (bandwidth, latency)} measured across `nproc` local processes."""
    with tempfile.TemporaryDirectory(prefix="zeroplan-probe-") as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_collective_worker, args=(nproc, device, os.path.join(tmp, "store"), sizes, out), nprocs=nproc)
        times = json.loads(Path(out).read_text())
    return {op: _fit(sizes, t, op=op, world=nproc) for op, t in times.items()}


def _sizes(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {"matmul": 4096, "copy": 1024 * MiB, "h2d": 256 * MiB, "disk": 1024 * MiB,
                "collective": [1 * MiB, 16 * MiB, 128 * MiB]}
    if quick:
        return {"matmul": 512, "copy": 64 * MiB, "disk": 32 * MiB, "collective": [64 << 10, 1 * MiB, 4 * MiB]}
    return {"matmul": 1024, "copy": 256 * MiB, "disk": 256 * MiB, "collective": [256 << 10, 4 * MiB, 32 * MiB]}


def probe_cluster(*, nproc: int | None = None, path: str | Path = ".", quick: bool = False) -> ClusterSpec:
    """Measure this node as `nproc` ranks and return its ClusterSpec (named `local`)."""
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
    if nproc > 1:
        rates = collective_rates(nproc=nproc, device=device, sizes=sizes["collective"])
        bandwidth, latency = rates["all_reduce"]
        notes.append("collectives (bandwidth B/s, latency s per ring step): " + ", ".join(
            f"{op} {bw:.3g} / {lat:.3g}" for op, (bw, lat) in rates.items()))
    else:
        bandwidth, latency = device_copy / 2, 0.0
        notes.append("one rank: no collectives measured; bandwidth is half the copy rate")
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
        rates=ClusterRates(matmul_flops_fp32=fp32, matmul_flops_16bit=bf16, memory_bandwidth=device_copy,
                           host_memory_bandwidth=host_copy / (nproc if device == "cpu" else 1),
                           intra_node_bandwidth=bandwidth, intra_node_latency=latency,
                           inter_node_bandwidth=bandwidth, inter_node_latency=latency,
                           host_to_device_bandwidth=h2d, disk_write_bandwidth=write, disk_read_bandwidth=read))
