"""Throughput of parallel layouts at one world size: dp-only vs pipeline (and tensor) parallel.

Every layout trains the same model on the same global batch with the same ZeRO stage, so
only the layout differs. Each is compiled and run through the CLI a user would type:

    zeroplan compile CONFIG --model small --cluster cpu --nproc-per-node 4 --set parallel.pp=2 ... --out DIR
    OMP_NUM_THREADS=1 zeroplan train DIR/plan.json --model small --steps N --metrics DIR/m.jsonl

Layouts run round-robin for `--rounds` rounds (the machine is shared and noisy); a layout's
figure is the median over rounds of its mean step time (the first step, with warm-up, left
out). Ratios are against dp-only measured in the same run. Tensor-parallel layouts are tried
as well; a layout the compiler or the runtime refuses (e.g. tp not dividing the heads) is listed
as skipped with its reason.

Usage: python -m bench.parallel_degrees [--model small] [--nproc 4] [--steps 6] [--rounds 2] [--gpipe]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from zeroplan.schemas.steps import SummaryRecord, read_summary

from .launch import exit_on_sigterm
from .report import machine_lines, result_path, table, write

ZEROPLAN = [sys.executable, "-m", "zeroplan"]
CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 1, "overlap_comm": False, "reduce_bucket_size": 5e5, "allgather_bucket_size": 5e6},
}


@dataclass
class Layout:
    name: str
    sets: dict[str, object]
    runs: list[SummaryRecord] = field(default_factory=list)
    plan: dict | None = None
    skipped: str | None = None


def layouts(nproc: int, *, gpipe: bool) -> list[Layout]:
    """dp-only, every pp degree dividing nproc (1F1B; GPipe too when asked), every tp degree,
    and tp2 x pp2 when 4 divides nproc."""
    divisors = [d for d in range(2, nproc + 1) if nproc % d == 0]
    out = [Layout(f"dp{nproc}", {"parallel.dp": nproc})]
    for pp in divisors:
        for schedule in ("1f1b", "gpipe") if gpipe else ("1f1b",):
            out.append(Layout(f"dp{nproc // pp} x pp{pp} {schedule}",
                              {"parallel.pp": pp, "parallel.pipeline.schedule": schedule}))
    out += [Layout(f"dp{nproc // tp} x tp{tp}", {"parallel.tp": tp}) for tp in divisors]
    if nproc % 4 == 0:
        out.append(Layout(f"dp{nproc // 4} x tp2 x pp2 1f1b", {"parallel.tp": 2, "parallel.pp": 2}))
    return out


def _run(cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def measure(layout: Layout, *, args, work: Path, config: Path, round_: int) -> None:
    """Compile and train one layout once; append the summary or record why it was skipped."""
    out = work / f"{layout.name.replace(' ', '_')}-{round_}"
    sets = [x for k, v in {**layout.sets, "train_batch_size": args.global_batch}.items() for x in ("--set", f"{k}={v}")]
    comp = _run([*ZEROPLAN, "compile", str(config), "--model", args.model, "--cluster", "cpu",
                 "--nproc-per-node", str(args.nproc), *sets, "--out", str(out)], timeout=120)
    if comp.returncode:
        layout.skipped = "compile: " + _last_error(comp)
        return
    metrics = out / "m.jsonl"
    run = _run([*ZEROPLAN, "train", str(out / "plan.json"), "--model", args.model, "--steps", str(args.steps),
                "--metrics", str(metrics)], timeout=args.timeout)
    if run.returncode:
        layout.skipped = "train: " + _last_error(run)
        return
    layout.plan = json.loads((out / "plan.json").read_text())
    layout.runs.append(read_summary(metrics))


def _last_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI's `error:` line with the problems listed under it, else the last exception line."""
    lines = [x.strip() for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
    starts = [i for i, x in enumerate(lines) if x.startswith("error: ")]
    if starts:
        problems = [x for x in lines[starts[-1] + 1:] if x.startswith("- ")]
        return " ".join([lines[starts[-1]], *problems])[:400]
    errors = [x for x in lines if "Error" in x]
    return (errors or lines or ["no output"])[-1][:400]


def row(layout: Layout, base: float | None) -> list[str]:
    p = layout.plan["parallel"]
    m, pp = p["pipeline_micro_batches"], p["pp"]
    step = statistics.median(r.mean_step_time_s for r in layout.runs)
    samples = layout.plan["batch"]["global_batch_size"] / step
    sent = getattr((layout.runs[-1].comms_per_step or {}).get("pp.send"), "bytes", 0)
    bubble = (pp - 1) / (m + pp - 1) if pp > 1 else 0.0
    predicted = layout.plan["estimates"]["predicted_step_time_s"]
    peak = max(r.peak_memory_bytes for r in layout.runs) / 2 ** 20
    return [layout.name, f"{p['dp']}x{p['tp']}x{pp}", str(m if pp > 1 else "-"), f"{bubble:.0%}",
            f"{step * 1000:.0f}", f"{samples:.2f}", f"{samples / base:.2f}x" if base else "1.00x",
            f"{sent / 2 ** 20:.1f}", f"{predicted * 1000:.0f}", f"{peak:.0f}",
            f"{statistics.median(r.loss_end for r in layout.runs):.4f}", str(len(layout.runs))]


def report(all_layouts: list[Layout], *, args, command: str) -> list[str]:
    done = [x for x in all_layouts if x.runs and not x.skipped]
    base = next((x for x in done if x.plan["parallel"]["pp"] == 1 and x.plan["parallel"]["tp"] == 1), None)
    base_samples = base and base.plan["batch"]["global_batch_size"] / statistics.median(
        r.mean_step_time_s for r in base.runs)
    lines = ["# Parallel layouts at one world size: dp-only vs pipeline vs tensor parallel", "",
             *machine_lines({}), f"- command: `{command}`",
             f"- {args.nproc} processes on gloo, OMP_NUM_THREADS=1 per rank; the machine has {os.cpu_count()} "
             f"cores, so {args.nproc} ranks oversubscribe them: ranks take turns on the cores",
             f"- model `{args.model}`, fp32, ZeRO stage 1, global batch {args.global_batch} (micro-batch 1; "
             "the accumulation count, which is the pipeline's micro-batch count m, is derived), "
             f"{args.steps} steps per run, first step left out",
             "- step ms: median over rounds of the mean step time; samples/s = global batch / step; ratios "
             "against dp-only in the same run; bubble = (pp - 1) / (m + pp - 1), idle share of a stage in "
             "GPipe and 1F1B; p2p MiB: bytes rank 0 sent to the next stage per step (activations and "
             "their shape headers); predicted: the compiler's step-time estimate for the `cpu` cluster preset", ""]
    headers = ["layout", "dp x tp x pp", "m", "bubble", "step ms", "samples/s", "vs dp-only", "p2p MiB",
               "predicted ms", "peak RSS/rank MiB", "loss end", "rounds"]
    lines += table(headers, [row(x, base_samples) for x in done], right=[False, False] + [True] * 10)
    lines.append("")
    lines += [f"- `{x.name}` skipped: {x.skipped}" for x in all_layouts if x.skipped]
    return lines


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(prog="python -m bench.parallel_degrees", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--gpipe", action="store_true", help="also run GPipe (same bubble as 1F1B, more activations)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per training run")
    ap.add_argument("--out", type=Path, default=None, help="results file (default bench/results/parallel_degrees-DATE.md)")
    args = ap.parse_args(argv)
    command = "python -m bench.parallel_degrees " + shlex.join(argv if argv is not None else sys.argv[1:])
    all_layouts = layouts(args.nproc, gpipe=args.gpipe)
    with tempfile.TemporaryDirectory(prefix="zeroplan-degrees-") as tmp:
        work = Path(tmp)
        config = work / "config.json"
        config.write_text(json.dumps(CONFIG))
        for round_ in range(args.rounds):
            for layout in all_layouts:
                if layout.skipped is None:
                    measure(layout, args=args, work=work, config=config, round_=round_)
                    status = layout.skipped or f"{layout.runs[-1].mean_step_time_s:.2f} s/step"
                    print(f"round {round_ + 1}: {layout.name}: {status}", flush=True)
    path = write(args.out or result_path("parallel_degrees"), report(all_layouts, args=args, command=command))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
