"""Gloo's flat reduce-scatter and all-gather against the per-rank forms Collectives uses.

runtime/comm.py runs a reduce-scatter on gloo as one `reduce` per rank (each to the rank that
owns the slice) and an all-gather as one `broadcast` per rank, all launched before any is
waited, instead of torch's `reduce_scatter_tensor` / `all_gather_into_tensor`. This measures
why: for each world size and buffer size, `--pairs` interleaved pairs (bench/pairs.py) of the
flat form and the per-rank form on the same buffer, each side timed as the median of `--reps`
calls after a barrier; the ratio is flat time over per-rank time (> 1: per-rank faster).

Usage: python -m bench.collectives [--worlds 2 4] [--elements 1048576 8388608] [--pairs 7] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zeroplan.runtime.comm import Collectives, CommsLogger
from zeroplan.runtime.procs import free_port

from .pairs import median_interval
from .report import machine_lines, result_path, table, write

OPS = ("reduce_scatter", "all_gather")


def _timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _calls(op: str, coll: Collectives, n: int) -> tuple:
    """(flat call, per-rank call) of `op` over a buffer of `n` elements."""
    world = coll.size
    whole = torch.randn(n)
    part = torch.randn(n // world)
    if op == "reduce_scatter":
        return (lambda: dist.reduce_scatter_tensor(part, whole),
                lambda: coll.reduce_scatter(part, whole, scratch_input=True))
    return (lambda: dist.all_gather_into_tensor(whole, part), lambda: coll.all_gather(whole, part))


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    coll = Collectives(group=dist.group.WORLD, logger=CommsLogger())
    rows = []
    for n in args.elements:
        n -= n % world
        for op in OPS:
            flat, per_rank = _calls(op, coll, n)
            ratios, loads = [], []
            for i in range(args.pairs):
                loads.append(os.getloadavg()[0])
                order = (flat, per_rank) if i % 2 == 0 else (per_rank, flat)
                first, second = (_timed(fn, args.reps) for fn in order)
                a, b = (first, second) if i % 2 == 0 else (second, first)
                ratios.append(a / b)
                if rank == 0:
                    print(f"[collectives] world {world} {op} {n}: pair {i + 1}: flat {a * 1e3:.1f} ms, "
                          f"per-rank {b * 1e3:.1f} ms", file=sys.stderr, flush=True)
            rows.append((world, op, n, ratios, loads))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=3600)
    for p in procs:
        p.join(timeout=60)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.collectives", description=__doc__.splitlines()[0])
    p.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    p.add_argument("--elements", nargs="+", type=int, default=[1 << 20, 1 << 23])
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    command = "python -m bench.collectives " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows = []
    for world in args.worlds:
        for w, op, n, ratios, loads in measure(world, args):
            interval = median_interval(ratios)
            rows.append([w, op, f"{n:,}", len(ratios), interval.text(),
                         interval.verdict(above="per-rank faster", below="flat faster"),
                         f"{min(loads):.1f}-{max(loads):.1f}"])
    lines = ["# gloo: flat reduce-scatter / all-gather against Collectives' per-rank forms", "",
             *machine_lines({}), f"- command: `{command.strip()}`",
             "- fp32, one intra-op thread per rank; ratio = flat time / per-rank time (> 1: per-rank faster), "
             "median [90% bootstrap interval] over interleaved pairs (bench/pairs.py)", "",
             *table(["ranks", "collective", "elements", "pairs", "ratio", "", "load"], rows,
                    right=[True, False, True, True, True, False, False])]
    print(write(args.out or result_path("collectives"), lines).read_text())


if __name__ == "__main__":
    main()
