"""Start-up peak resident memory per rank at ZeRO-3: the model built eagerly on every rank
(`zeroplan-z3`) against the model built on the meta device and materialised shard by shard
by `initialize` (`zeroplan-z3-meta`, runtime/meta_init.py), 2 ranks (`--world`), one intra-op
thread each.

Each run is fresh rank processes (bench.launch) that build the model, call `initialize` and
stop (no training step). Per rank: `baseline`, the RSS before the model is built (interpreter,
torch, the process group); `sharded peak`, the high-water mark (VmHWM) once the model is built
and sharded, just before the optimizer allocates its states (the part a meta build changes);
`setup peak`, the high-water mark once `initialize` has returned. The differences from the
baseline are what building and sharding the model, and the whole start-up, cost that rank.
With fp32 AdamW on 2 ranks the eager build's whole model (M) weighs exactly what the rank's
Adam states do (2 x M/2), so `setup peak` alone cannot tell the two builds apart; from 3
ranks on the eager build's whole model is the start-up's peak and the meta build's is the
rank's share. Runs
are interleaved in pairs (neither variant always first); the median over pairs is reported,
with the load average at each pair's start. The plan's estimate of the same start-up is the
compiler's model states per rank (parameters, gradients, optimizer states, master weights)
and its fixed start-up overhead.

Usage: python -m bench.sharded_init [--preset medium] [--world 2] [--pairs 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

from .launch import exit_on_sigterm, launch
from .report import machine_lines, mib, result_path, table, write
from .workload import Workload, compile_plan

VARIANTS = {"eager": "zeroplan-z3-peak", "meta": "zeroplan-z3-meta"}
STATES = ("parameters", "gradients", "optimizer_states", "master_weights")


def measure(workload: Workload, *, pairs: int, log=print) -> tuple[dict[str, list[list[dict]]], list[float]]:
    """Per variant, per pair, the ranks' worker results; and the load average at each pair's start."""
    runs: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    loads = []
    for i in range(pairs):
        loads.append(os.getloadavg()[0])
        order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            log(f"[sharded_init] pair {i + 1}/{pairs}: {variant}")
            runs[variant].append(launch(VARIANTS[variant], workload).ranks)
    return runs, loads


def rank_rows(runs: dict[str, list[list[dict]]], *, world: int) -> list[list[object]]:
    """Per variant and rank, medians (MiB): baseline, and each peak above the baseline."""
    rows = []
    for variant, pairs in runs.items():
        for rank in range(world):
            def median(key: str, *, above: bool = True) -> str:
                base = (lambda p: p[rank]["baseline_rss_bytes"]) if above else (lambda p: 0)
                return mib(statistics.median(p[rank][key] - base(p) for p in pairs))

            rows.append([variant, rank, median("baseline_rss_bytes", above=False),
                         median("sharded_peak_rss_bytes"), median("setup_peak_rss_bytes")])
    return rows


def report(workload: Workload, runs: dict, loads: list[float], *, command: str, uptime: str) -> list[str]:
    spec = workload.spec
    estimate = compile_plan(workload, stage=3).estimates.memory_per_rank
    states = sum(estimate[k] for k in STATES)
    shard = sum(-(-n // workload.world_size) for n in _param_numels(spec)) * 4
    lines = ["# Sharded initialisation: start-up peak RSS per rank at ZeRO-3", "",
             f"Command: `{command}`", "", *machine_lines({}),
             f"- `uptime` before the runs: {uptime}",
             f"- load average (1 min) at each pair's start: {', '.join(f'{x:.2f}' for x in loads)}", "",
             f"Model: built-in GPT `{workload.preset}` ({spec.total_params:,} parameters, "
             f"{mib(spec.total_params * 4)} MiB in fp32; one rank's fp32 shard {mib(shard)} MiB), "
             f"{workload.world_size} ranks, fp32, AdamW; `initialize` then stop, no step. "
             f"Medians over {len(loads)} interleaved pairs.", "",
             *table(["build", "rank", "baseline MiB", "sharded peak - baseline MiB", "setup peak - baseline MiB"],
                    rank_rows(runs, world=workload.world_size), right=[False, True, True, True, True]), "",
             "The plan's estimate for the same start-up (compile_plan, ZeRO-3, per rank): model states "
             f"{mib(states)} MiB (" + ", ".join(f"{k} {mib(estimate[k])}" for k in STATES)
             + f") plus the fixed start-up overhead {mib(estimate.get('overhead'))} MiB "
             "(the baseline column measures that part). Before the optimizer's states exist the plan's "
             f"states are gradients + master weights = {mib(estimate['gradients'] + estimate['master_weights'])} MiB; "
             f"an eager build adds the whole model ({mib(spec.total_params * 4)} MiB) to that on every rank."]
    return lines


def _param_numels(spec) -> list[int]:
    from zeroplan.runtime.models import GPT  # on meta: shapes only
    import torch

    with torch.device("meta"):
        model = GPT(spec)
    return [p.numel() for p in {id(p): p for p in model.parameters()}.values()]


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m bench.sharded_init", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--world", type=int, default=2, help="ranks (memory only: more ranks than cores is fine)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    command = "python -m bench.sharded_init " + shlex.join(argv if argv is not None else sys.argv[1:])
    uptime = os.popen("uptime").read().strip()
    workload = Workload(preset=args.preset, world_size=args.world, micro_batch_size=1, steps=0, warmup=0)
    runs, loads = measure(workload, pairs=args.pairs)
    path = write(args.out or result_path("sharded_init"), report(workload, runs, loads, command=command.strip(),
                                                                  uptime=uptime))
    print(f"[sharded_init] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
