"""Step throughput, memory and loss of zeroplan at ZeRO 0-3 against its peers, on 2 gloo ranks.

Every measurement is a fresh process group (bench.launch): one system, one workload, its own
processes, so each peak RSS belongs to that system alone. Systems run in rounds, A B C ...
A B C ..., so that drift on a shared machine hits all of them alike; each row pools the
timed steps (after `warmup`) of every round, reports the median, and the ratio against DDP
measured in the same run. The loss of every step is averaged over ranks; every system starts
from the same weights and reads the same batches, so the losses must agree (`LOSS_TOLERANCE`).

Usage: python -m bench.throughput [--presets small medium] [--systems ddp zeroplan-z0 ...]
       [--steps 8] [--warmup 2] [--reps 2] [--budget-s 900] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .budget import STARTUP_S, Budget, work_per_sample
from .launch import LaunchError, Measurement, launch, start_main
from .report import machine_lines, mib, result_path, table, write
from .systems import SYSTEMS, get_system
from .workload import Workload

DEFAULT_SYSTEMS = ["ddp", "zeroplan-z0", "deepspeed-z0", "zero_optimizer", "zeroplan-z1", "deepspeed-z1",
                   "zeroplan-z2", "deepspeed-z2", "fsdp2", "zeroplan-z3", "deepspeed-z3",
                   "zeroplan-z2-offload-cpu", "deepspeed-z2-offload-cpu", "zeroplan-z3-offload-cpu",
                   "deepspeed-z3-offload-cpu"]
"""Stage 1 offload runs with --systems (ZeRO-Offload's paper configuration is stage 2)."""
MICRO_BATCH = {"tiny": 4, "small": 2, "medium": 1}
"""Samples per rank per step by preset: global batch 2 x this, one micro-batch per step."""
REFERENCE = "ddp"
LOSS_TOLERANCE = 1e-4
"""Largest |loss - reference loss| (nats, after the same steps) called agreement. Every system
computes the same fp32 function on the same data; only the order of floating-point sums
(bucketing, reduce-scatter vs all-reduce, sharded norms) differs, which moves the loss by
~1e-6 over ten steps here. A wrong update (scaling, clip, missed gradient) moves it by far
more than 1e-4."""
COLUMNS = ["preset", "system", "sharding", "samples_per_s", "ratio_vs_ddp", "step_ms", "spread",
           "peak_rss_bytes", "rss_ratio_vs_ddp", "after_setup_rss_bytes", "loss_first", "loss_last",
           "loss_delta_vs_ddp", "loss_agrees", "rounds"]


@dataclass
class Row:
    preset: str
    system: str
    sharding: str
    samples_per_s: float
    ratio_vs_ddp: float | None
    step_ms: float
    spread: float
    """(max - min) / median of the per-round throughputs: how much the rounds disagree."""
    peak_rss_bytes: int
    """Max over ranks of the peak RSS, median over rounds."""
    rss_ratio_vs_ddp: float | None
    after_setup_rss_bytes: int
    loss_first: float
    loss_last: float
    loss_delta_vs_ddp: float | None
    loss_agrees: bool | None
    rounds: int


PAIRS = [("zeroplan-z0", "ddp"), ("zeroplan-z0", "deepspeed-z0"), ("zeroplan-z1", "zero_optimizer"),
         ("zeroplan-z1", "deepspeed-z1"), ("zeroplan-z2", "deepspeed-z2"), ("zeroplan-z3", "fsdp2"),
         ("zeroplan-z3", "deepspeed-z3"), ("zeroplan-z3", "ddp"),
         *((f"zeroplan-z{s}-offload-cpu", f"deepspeed-z{s}-offload-cpu") for s in (1, 2, 3))]
"""(zeroplan system, peer) compared head to head: the peer at the same stage, DDP for ZeRO-3's
target of DDP's throughput."""


@dataclass
class Pair:
    """zeroplan against one peer, paired round by round (both ran within minutes of each other)."""

    preset: str
    system: str
    peer: str
    throughput_ratios: list[float]
    """zeroplan's samples/s over the peer's, per round (medians of the round's timed steps)."""
    rss_ratio: float
    """zeroplan's peak RSS per rank over the peer's (the rows' medians over rounds)."""


@dataclass
class PresetResult:
    workload: Workload
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, list[dict]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    """The machine's 1-minute load average at the start of each round and at the end."""
    pairs: list[Pair] = field(default_factory=list)


def measure(workload: Workload, systems: list[str], *, reps: int, budget: Budget, first_round_s: float,
            required: bool = False, log=print) -> PresetResult:
    """Run `systems` alternately `reps` rounds (fewer if the budget runs out; a `required` preset
    always gets its first round) and aggregate."""
    result = PresetResult(workload=workload)
    runnable = []
    for name in systems:
        reason = get_system(name).unavailable()
        if reason:
            result.notes.append(f"`{name}` skipped: {reason}")
        else:
            runnable.append(name)
    runs: dict[str, list[Measurement]] = {name: [] for name in runnable}
    round_s = first_round_s
    for rep in range(reps):
        if not (required and rep == 0) and not budget.fits(round_s):
            result.notes.append(f"{rep} of {reps} rounds run: the next (~{round_s:.0f}s) did not fit the budget")
            break
        start = time.monotonic()
        result.load.append(os.getloadavg()[0])
        for name in list(runnable):
            log(f"[throughput] {workload.preset} round {rep + 1}/{reps}: {name}")
            try:
                runs[name].append(launch(name, workload))
            except LaunchError as e:
                result.notes.append(f"`{name}` failed and was dropped: {str(e).strip().splitlines()[-1]}")
                log(f"[throughput] {name} failed:\n{e}")
                runnable.remove(name)
        round_s = time.monotonic() - start
    result.load.append(os.getloadavg()[0])
    result.raw = {name: [m.ranks for m in ms] for name, ms in runs.items() if ms}
    result.rows = aggregate(workload, {n: ms for n, ms in runs.items() if ms})
    result.pairs = pair_up(workload, runs, result.rows)
    return result


def _round_throughput(workload: Workload, m: Measurement) -> float:
    return workload.global_batch_size / statistics.median(m.ranks[0]["step_times_s"][workload.warmup:])


def pair_up(workload: Workload, runs: dict[str, list[Measurement]], rows: list[Row]) -> list[Pair]:
    """Head-to-head ratios for every pair of PAIRS that both ran (rounds matched by index)."""
    by_name = {r.system: r for r in rows}
    out = []
    for system, peer in PAIRS:
        mine, theirs = runs.get(system) or [], runs.get(peer) or []
        n = min(len(mine), len(theirs))
        if n:
            out.append(Pair(preset=workload.preset, system=system, peer=peer,
                            throughput_ratios=[_round_throughput(workload, a) / _round_throughput(workload, b)
                                               for a, b in zip(mine[:n], theirs[:n])],
                            rss_ratio=by_name[system].peak_rss_bytes / by_name[peer].peak_rss_bytes))
    return out


def aggregate(workload: Workload, runs: dict[str, list[Measurement]]) -> list[Row]:
    rows = []
    for name, ms in runs.items():
        timed = [t for m in ms for t in m.ranks[0]["step_times_s"][workload.warmup:]]
        per_round = [_round_throughput(workload, m) for m in ms]
        median_s = statistics.median(timed)
        losses = ms[0].ranks[0]["losses"]
        rows.append(Row(
            preset=workload.preset, system=name, sharding=SYSTEMS[name].sharding,
            samples_per_s=workload.global_batch_size / median_s, ratio_vs_ddp=None, step_ms=1e3 * median_s,
            spread=(max(per_round) - min(per_round)) / statistics.median(per_round),
            peak_rss_bytes=int(statistics.median(max(r["peak_rss_bytes"] for r in m.ranks) for m in ms)),
            rss_ratio_vs_ddp=None,
            after_setup_rss_bytes=int(statistics.median(max(r["after_setup_rss_bytes"] for r in m.ranks) for m in ms)),
            loss_first=losses[0], loss_last=losses[-1], loss_delta_vs_ddp=None, loss_agrees=None, rounds=len(ms)))
    ref = next((r for r in rows if r.system == REFERENCE), None)
    if ref is not None:
        for r in rows:
            r.ratio_vs_ddp = r.samples_per_s / ref.samples_per_s
            r.rss_ratio_vs_ddp = r.peak_rss_bytes / ref.peak_rss_bytes
            r.loss_delta_vs_ddp = r.loss_last - ref.loss_last
            r.loss_agrees = abs(r.loss_delta_vs_ddp) <= LOSS_TOLERANCE
    return rows


def preset_workload(preset: str, *, steps: int, warmup: int, micro: int | None = None) -> Workload:
    return Workload(preset=preset, micro_batch_size=micro or MICRO_BATCH[preset], steps=steps, warmup=warmup)


def run(*, presets: list[str], systems: list[str], steps: int, warmup: int, reps: int, budget: Budget,
        log=print, steps_by_preset: dict[str, int] | None = None) -> list[PresetResult]:
    """Measure each preset in turn, smallest first. The first always gets one round; a later
    round or preset that would not fit the budget (a preset's cost extrapolated from the
    previous preset's step time by work per sample) is skipped and said so."""
    out: list[PresetResult] = []
    runnable = sum(get_system(name).unavailable() is None for name in systems)
    step_s = 0.5  # seconds per step and system, before anything was measured
    previous: tuple[str, int] | None = None  # preset, global batch
    for preset in sorted(presets, key=work_per_sample):
        n = (steps_by_preset or {}).get(preset, steps)
        workload = preset_workload(preset, steps=n, warmup=min(warmup, n - 1))
        if previous is not None:
            p, batch = previous
            step_s *= work_per_sample(preset) * workload.global_batch_size / (work_per_sample(p) * batch)
        estimate = runnable * (STARTUP_S + n * step_s)
        result = measure(workload, systems, reps=reps, budget=budget, first_round_s=estimate, required=not out,
                         log=log)
        out.append(result)
        times = [t for rounds in result.raw.values() for ranks in rounds for t in ranks[0]["step_times_s"]]
        if times:
            step_s, previous = statistics.mean(times), (preset, workload.global_batch_size)
    return out


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def to_markdown(results: list[PresetResult], *, command: str, peers: dict[str, str]) -> list[str]:
    lines = ["# Step throughput and memory against peers", "", *machine_lines(peers), f"- command: `{command}`"]
    if results:
        w = results[0].workload
        lines += [
            f"- {w.world_size} processes, gloo, one intra-op thread per rank; fp32; AdamW (lr {w.lr}, betas "
            f"{list(w.betas)}, weight decay {w.weight_decay}), global-norm clip {w.clip}, no schedule; Markov-chain "
            f"data (seed {w.seed}), identical initial weights (seed {w.seed}); the AdamW kernel is torch's fused one "
            "for zeroplan (the compiler's CPU choice), DDP, ZeroRedundancyOptimizer and FSDP2; DeepSpeed picks its "
            "own for `\"type\": \"AdamW\"`: FusedAdam (CPU build), and DeepSpeedCPUAdam with offload (zeroplan's "
            "offload plans name its cpu_adam kernel)",
            "- each measurement is a fresh process group; systems alternate round by round; samples/s = global "
            "batch / median step time over the timed steps of all rounds; spread = (max - min) / median of the "
            "per-round throughputs; peak RSS = VmHWM (the process's high-water mark; bench/worker.py says why "
            "not ru_maxrss), max over ranks (median over rounds), start-up included; "
            "ratios are against DDP in the same run",
            f"- losses are averaged over ranks; `agrees` means |loss - DDP's loss| <= {LOSS_TOLERANCE} after the "
            "same steps"]
    for res in results:
        w = res.workload
        lines += ["", f"## {w.preset} ({w.spec.total_params / 1e6:.1f}M parameters, seq {w.spec.seq_len}), global "
                  f"batch {w.global_batch_size} = micro {w.micro_batch_size} x {w.world_size} ranks, {w.steps} steps "
                  f"({w.warmup} warm-up)", ""]
        if not res.rows:
            lines += ["Not measured.", ""] + [f"- {n}" for n in res.notes]
            continue
        rows = [[r.system, r.sharding, f"{r.samples_per_s:.2f}", _fmt(r.ratio_vs_ddp, ".2f") + "x",
                 f"{r.step_ms:.0f}", f"{100 * r.spread:.0f}%", mib(r.peak_rss_bytes),
                 _fmt(r.rss_ratio_vs_ddp, ".2f") + "x", mib(r.after_setup_rss_bytes), f"{r.loss_first:.5f}",
                 f"{r.loss_last:.5f}", _fmt(r.loss_delta_vs_ddp, "+.1e"),
                 {True: "yes", False: "**NO**", None: "-"}[r.loss_agrees], r.rounds] for r in res.rows]
        lines += table(["system", "sharding", "samples/s", "vs DDP", "step ms", "spread", "peak RSS/rank MiB",
                        "RSS vs DDP", "RSS after setup MiB", f"loss step 1", f"loss step {w.steps}",
                        "Δloss vs DDP", "agrees", "rounds"], rows,
                       right=[False, False] + [True] * 11 + [True])
        if res.pairs:
            lines += ["", "Head to head, round by round (each ratio from one round, where both ran minutes apart):",
                      ""]
            lines += table(["zeroplan", "peer", "throughput ratio, median", "per round", "peak RSS ratio"],
                           [[p.system, p.peer, f"{statistics.median(p.throughput_ratios):.2f}x",
                             ", ".join(f"{r:.2f}" for r in p.throughput_ratios), f"{p.rss_ratio:.2f}x"]
                            for p in res.pairs], right=[False, False, True, True, True])
        if res.load:
            lines += ["", "- load average (1 min) at the start of each round, then at the end: "
                      + ", ".join(f"{x:.1f}" for x in res.load) + f" ({os.cpu_count()} cores)"]
        if res.notes:
            lines += [""] + [f"- {n}" for n in res.notes]
    return lines


def peer_versions(systems: list[str]) -> dict[str, str]:
    """Version of each peer family used, or why it is absent."""
    out = {}
    for name in systems:
        cls = get_system(name)
        family = name.split("-")[0]
        if family in out:
            continue
        reason = cls.unavailable()
        out[family] = f"not run ({reason})" if reason else cls.version()
    return out


def save(results: list[PresetResult], *, command: str, systems: list[str], out=None) -> tuple:
    path = out or result_path("throughput")
    write(path, to_markdown(results, command=command, peers=peer_versions(systems)))
    raw = path.with_suffix(".json")
    raw.write_text(json.dumps([{"workload": asdict(r.workload), "rows": [asdict(x) for x in r.rows],
                                "pairs": [asdict(x) for x in r.pairs], "load": r.load, "notes": r.notes,
                                "ranks": r.raw} for r in results], indent=1))
    return path, raw


def preset_steps(text: str) -> tuple[str, int]:
    """`medium=3` -> ("medium", 3), for --steps-by-preset."""
    preset, _, n = text.partition("=")
    if preset not in MICRO_BATCH or not n.isdigit() or int(n) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PRESET=N with PRESET one of {', '.join(MICRO_BATCH)} "
                                         "and N >= 2 (one warm-up step and one timed)")
    return preset, int(n)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small"], choices=list(MICRO_BATCH))
    p.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="rounds over all systems")
    p.add_argument("--steps-by-preset", nargs="+", default=[], metavar="PRESET=N", type=preset_steps,
                   help="steps for a preset instead of --steps (warm-up capped at N - 1), e.g. medium=3")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", default=None, help="markdown file (default: bench/results/throughput-DATE.md)")
    return p


def main(argv: list[str] | None = None) -> list[PresetResult]:
    args = parser().parse_args(argv)
    command, log = start_main("bench.throughput", argv)
    results = run(presets=args.presets, systems=args.systems, steps=args.steps, warmup=args.warmup, reps=args.reps,
                  budget=Budget(args.budget_s), log=log, steps_by_preset=dict(args.steps_by_preset))
    path, raw = save(results, command=command, systems=args.systems, out=Path(args.out) if args.out else None)
    print(path.read_text())
    log(f"written to {path} and {raw}")
    return results


if __name__ == "__main__":
    main()
