"""Where one step's time goes: zeroplan beside a peer, one profiled step each.

The head-to-head ratio (bench/head_to_head.py) says whether zeroplan is slower; this says
where. Each system of a pair trains the same workload for `--steps` steps, then one more under
torch.profiler on every rank (bench/worker.py, `Workload.profile`); rank 0's operators are
shown side by side, ordered by the difference in self time, so the rows at the top are the
gap. The profiler's overhead inflates both columns alike and the timed steps are not
profiled; one run per system is a description, not a measurement to quote as a ratio.

Usage: python -m bench.step_profile --preset medium --pair zeroplan-z3:ddp [--pair ...]
       [--steps 3] [--rows 15] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from .launch import Measurement, launch, start_main
from .report import machine_lines, result_path, table, write
from .throughput import peer_versions, preset_workload


def ops_by_name(m: Measurement) -> dict[str, dict]:
    return {op["name"]: op for op in m.ranks[0]["profile"]["ops"]}


def compare_rows(mine: Measurement, theirs: Measurement, *, rows: int) -> list[list[str]]:
    """The operators of either system's top list, largest difference in self time first."""
    a, b = ops_by_name(mine), ops_by_name(theirs)
    none = {"calls": 0, "self_ms": 0.0}
    names = sorted(a.keys() | b.keys(),
                   key=lambda n: -abs(a.get(n, none)["self_ms"] - b.get(n, none)["self_ms"]))
    out = []
    for name in names[:rows]:
        x, y = a.get(name, none), b.get(name, none)
        out.append([f"`{name}`", x["calls"], f"{x['self_ms']:.1f}", y["calls"], f"{y['self_ms']:.1f}",
                    f"{x['self_ms'] - y['self_ms']:+.1f}"])
    return out


def summary(m: Measurement, warmup: int) -> str:
    p = m.ranks[0]["profile"]
    timed = statistics.median(m.ranks[0]["step_times_s"][warmup:]) * 1e3
    return (f"{m.system}: timed step {timed:.0f} ms (median, unprofiled); profiled step {p['wall_ms']:.0f} ms "
            f"wall, {p['self_ms_total']:.0f} ms of operator self time over all threads")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="medium")
    p.add_argument("--pair", action="append", required=True, help="system:peer, e.g. zeroplan-z3:ddp")
    p.add_argument("--steps", type=int, default=3, help="unprofiled steps before the profiled one")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", type=Path, default=None, help="markdown file (default bench/results/step_profile-DATE.md)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command, log = start_main("bench.step_profile", argv)
    workload = dataclasses.replace(preset_workload(args.preset, steps=args.steps, warmup=1), profile=True)
    pairs = [tuple(x.split(":", 1)) for x in args.pair]
    names = sorted({n for pair in pairs for n in pair})
    lines = ["# One profiled step, zeroplan beside a peer", "", *machine_lines(peer_versions(names)),
             f"- command: `{command}`",
             f"- preset {args.preset}, 2 processes, gloo, one intra-op thread per rank, global batch "
             f"{workload.global_batch_size}; {args.steps} unprofiled steps, then one under torch.profiler (CPU); "
             "rank 0's operators, self time in ms summed over threads, ordered by the difference", ""]
    path = args.out or result_path("step_profile")
    for system, peer in pairs:
        log(f"[step_profile] {args.preset}: {system}, then {peer}")
        mine, theirs = launch(system, workload), launch(peer, workload)
        lines += [f"## {system} vs {peer}", "", f"- {summary(mine, workload.warmup)}",
                  f"- {summary(theirs, workload.warmup)}", "",
                  *table(["operator", f"{system} calls", "ms", f"{peer} calls", "ms", "difference ms"],
                         compare_rows(mine, theirs, rows=args.rows),
                         right=[False, True, True, True, True, True]), ""]
        write(path, lines)
    print(path.read_text())


if __name__ == "__main__":
    main()
