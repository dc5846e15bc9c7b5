"""zeroplan at each ZeRO stage against its peers, in interleaved pairs (bench/pairs.py).

For each (zeroplan system, peer) of bench.throughput.PAIRS whose peer is installed: `--pairs`
pairs of fresh 2-rank runs of the same workload (same weights, same Markov-chain batches, the
same AdamW), zeroplan and peer back to back, alternating which goes first. Per pair: the
throughput ratio (the peer's median step time over zeroplan's, rank 0's timed steps: above 1.0
is zeroplan faster), the peak-RSS ratio (VmHWM, max over ranks, zeroplan's over the peer's:
below 1.0 is zeroplan leaner) and whether the last losses agree (bench.throughput's
LOSS_TOLERANCE). Reported: each ratio's median with its 90% bootstrap interval, "faster" /
"slower" / "leaner" / "heavier" only when the interval excludes 1.0, and the load average at
each pair's start.

Usage: python -m bench.head_to_head [--presets small medium] [--pairs 7] [--steps 5]
       [--only zeroplan-z0:ddp ...] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from .launch import Measurement, launch, start_main
from .pairs import Interval, Pairs, interleave, median_interval
from .report import machine_lines, mib, result_path, table, write
from .systems import get_system
from .throughput import LOSS_TOLERANCE, PAIRS, peer_versions, preset_workload
from .workload import Workload


@dataclass
class HeadToHead:
    preset: str
    system: str
    peer: str
    runs: Pairs
    warmup: int

    def step_s(self, m: Measurement) -> float:
        return statistics.median(m.ranks[0]["step_times_s"][self.warmup:])

    @staticmethod
    def peak(m: Measurement) -> int:
        return max(r["peak_rss_bytes"] for r in m.ranks)

    def throughput(self) -> Interval:
        return median_interval(self.runs.ratios(self.step_s, b_over_a=True))

    def memory(self) -> Interval:
        return median_interval(self.runs.ratios(self.peak))

    def losses_agree(self) -> bool:
        return all(abs(a.ranks[0]["losses"][-1] - b.ranks[0]["losses"][-1]) <= LOSS_TOLERANCE
                   for a, b in zip(self.runs.a, self.runs.b))


def compare(workload: Workload, *, system: str, peer: str, pairs: int, log=print) -> HeadToHead:
    runs = interleave(lambda: launch(system, workload), lambda: launch(peer, workload), pairs=pairs,
                      log=lambda msg: log(f"[head_to_head] {workload.preset} {system} vs {peer}: {msg}"))
    return HeadToHead(preset=workload.preset, system=system, peer=peer, runs=runs, warmup=workload.warmup)


def selected(only: list[str] | None) -> list[tuple[str, str]]:
    """PAIRS, or the `system:peer` ones named; peers that are not installed are left out."""
    chosen = PAIRS if not only else [tuple(x.split(":", 1)) for x in only]
    return [(s, p) for s, p in chosen if get_system(s).unavailable() is None and get_system(p).unavailable() is None]


def to_markdown(results: list[HeadToHead], *, command: str, workloads: dict[str, Workload]) -> list[str]:
    names = sorted({r.system for r in results} | {r.peer for r in results})
    lines = ["# zeroplan against its peers, interleaved pairs", "", *machine_lines(peer_versions(names)),
             f"- command: `{command}`",
             "- 2 processes, gloo, one intra-op thread per rank; fp32, AdamW, clip 1.0; same weights and batches",
             "- throughput ratio = peer step time / zeroplan step time (> 1: zeroplan faster); RSS ratio = "
             "zeroplan peak / peer peak (< 1: zeroplan leaner); median [90% bootstrap interval] over pairs; "
             "an interval holding 1.0 is not separated (bench/pairs.py)", ""]
    for preset, workload in workloads.items():
        rows = []
        for r in (r for r in results if r.preset == preset):
            t, m = r.throughput(), r.memory()
            rows.append([r.system, r.peer, len(r.runs.a), t.text(), t.verdict(above="faster", below="slower"),
                         f"{1e3 * statistics.median(map(r.step_s, r.runs.a)):.0f} / "
                         f"{1e3 * statistics.median(map(r.step_s, r.runs.b)):.0f}",
                         m.text(), m.verdict(above="heavier", below="leaner"),
                         f"{mib(statistics.median(map(r.peak, r.runs.a)))} / {mib(statistics.median(map(r.peak, r.runs.b)))}",
                         "yes" if r.losses_agree() else "NO", ", ".join(f"{x:.1f}" for x in r.runs.load)])
        lines += [f"## {preset}: global batch {workload.global_batch_size}, {workload.steps} steps "
                  f"({workload.warmup} warm-up)", "",
                  *table(["zeroplan", "peer", "pairs", "throughput ratio", "", "step ms zeroplan / peer",
                          "peak RSS ratio", "", "peak RSS MiB zeroplan / peer", "losses agree", "load per pair"],
                         rows, right=[False, False, True, True, False, True, True, False, True, False, False]), ""]
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.head_to_head", description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "medium"])
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="+", default=None, help="system:peer pairs (default: every pair of PAIRS)")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default bench/results/head_to_head-DATE.md)")
    return p


def main(argv: list[str] | None = None) -> list[HeadToHead]:
    args = parser().parse_args(argv)
    command, log = start_main("bench.head_to_head", argv)
    workloads = {p: preset_workload(p, steps=args.steps, warmup=min(args.warmup, args.steps - 1))
                 for p in args.presets}
    path = args.out or result_path("head_to_head")
    results = []
    for workload in workloads.values():
        for s, peer in selected(args.only):
            results.append(compare(workload, system=s, peer=peer, pairs=args.pairs, log=log))
            write(path, to_markdown(results, command=command.strip(), workloads=workloads))  # each row as it lands
    print(path.read_text())
    return results


if __name__ == "__main__":
    main()
