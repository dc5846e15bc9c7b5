"""What returning freed host tensors to the OS costs (runtime/host_memory.py): zeroplan's runtime
with glibc's mmap threshold fixed, as it runs on the CPU, against the same runtime with glibc's
dynamic threshold (`zeroplan-zN-heap`), in interleaved pairs of fresh process groups.

Per pair: the step-time ratio (fixed / heap, medians of the timed steps on rank 0) and the
peak-RSS ratio (VmHWM, max over ranks). Reported: the median ratio over pairs with its 90%
bootstrap interval (bench/pairs.py): an interval holding 1.0 is "not separated". The load
average at each pair's start is recorded.

Usage: python -m bench.host_memory [--preset small] [--stage 1] [--micro 8]
       [--activation-checkpointing off|on|both] [--pairs 5] [--steps 5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .launch import launch, start_main
from .pairs import interleave, median_interval
from .report import machine_lines, mib, result_path, table, write
from .workload import Workload


@dataclass
class Comparison:
    checkpointing: bool
    time_ratios: list[float] = field(default_factory=list)
    rss_ratios: list[float] = field(default_factory=list)
    fixed_rss: list[int] = field(default_factory=list)
    heap_rss: list[int] = field(default_factory=list)
    fixed_step_s: list[float] = field(default_factory=list)
    heap_step_s: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


def _step_s(m, warmup: int) -> float:
    return statistics.median(m.ranks[0]["step_times_s"][warmup:])


def _peak(m) -> int:
    return max(r["peak_rss_bytes"] for r in m.ranks)


def compare(workload: Workload, *, stage: int, pairs: int, log=print) -> Comparison:
    out = Comparison(checkpointing=workload.activation_checkpointing)
    fixed, heap = f"zeroplan-z{stage}", f"zeroplan-z{stage}-heap"
    runs = interleave(lambda: launch(fixed, workload), lambda: launch(heap, workload), pairs=pairs,
                      log=lambda msg: log(f"[host_memory] {msg} ({fixed} / {heap})"))
    out.load = runs.load
    out.fixed_step_s = [_step_s(a, workload.warmup) for a in runs.a]
    out.heap_step_s = [_step_s(b, workload.warmup) for b in runs.b]
    out.time_ratios = [a / b for a, b in zip(out.fixed_step_s, out.heap_step_s)]
    out.fixed_rss, out.heap_rss = [_peak(a) for a in runs.a], [_peak(b) for b in runs.b]
    out.rss_ratios = [a / b for a, b in zip(out.fixed_rss, out.heap_rss)]
    return out


def _summary(ratios: list[float]) -> str:
    interval = median_interval(ratios)
    return f"{interval.text()} ({interval.verdict(above='slower', below='faster')})"


def to_markdown(results: list[Comparison], *, workload: Workload, stage: int, command: str) -> list[str]:
    lines = ["# Host memory: glibc's mmap threshold fixed (zeroplan's CPU runtime) vs dynamic (heap)", "",
             *machine_lines({}), f"- command: `{command}`",
             f"- preset {workload.preset}, ZeRO stage {stage}, {workload.world_size} processes, gloo, one intra-op "
             f"thread per rank, micro-batch {workload.micro_batch_size}, {workload.steps} steps "
             f"({workload.warmup} warm-up); pairs alternate which system runs first",
             "- ratio = fixed / heap per pair; shown as median [90% bootstrap interval] over pairs (bench/pairs.py)", ""]
    rows = [["on" if c.checkpointing else "off", len(c.time_ratios), _summary(c.time_ratios),
             f"{1e3 * statistics.median(c.fixed_step_s):.0f} / {1e3 * statistics.median(c.heap_step_s):.0f}",
             _summary(c.rss_ratios), f"{mib(statistics.median(c.fixed_rss))} / {mib(statistics.median(c.heap_rss))}",
             ", ".join(f"{x:.1f}" for x in c.load)] for c in results]
    lines += table(["checkpointing", "pairs", "step time ratio", "step ms fixed / heap", "peak RSS ratio",
                    "peak RSS MiB fixed / heap", f"load (1 min) per pair, {os.cpu_count()} cores"], rows,
                   right=[False, True, True, True, True, True, False])
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    p.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--activation-checkpointing", choices=["off", "on", "both"], default="both")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None, help="markdown file (default: bench/results/host_memory-DATE.md)")
    return p


def main(argv: list[str] | None = None) -> list[Comparison]:
    args = parser().parse_args(argv)
    command, log = start_main("bench.host_memory", argv)
    results = []
    for ac in {"off": (False,), "on": (True,), "both": (False, True)}[args.activation_checkpointing]:
        workload = Workload(preset=args.preset, micro_batch_size=args.micro, steps=args.steps,
                            warmup=min(2, args.steps - 1), activation_checkpointing=ac)
        results.append(compare(workload, stage=args.stage, pairs=args.pairs, log=log))
    path = result_path("host_memory") if args.out is None else Path(args.out)
    write(path, to_markdown(results, workload=workload, stage=args.stage, command=command.strip()))
    print(path.read_text())
    return results


if __name__ == "__main__":
    main()
