"""`python -m bench`: every benchmark against peers in one command, within a time budget.

Sections, each writing its own results file under bench/results/ (machine and command in it):
1. throughput: zeroplan ZeRO 0-3 against DDP, ZeroRedundancyOptimizer, FSDP2 (and DeepSpeed
   when installed) on the built-in GPT, 2 gloo ranks (bench.throughput);
2. optimizer kernels: cpu_adam against torch.optim (bench.optimizer_kernels; --skip-kernels),
   written as optimizer_kernels-bench-<date>.md so the standalone run's file is kept;
3. memory model: predicted against measured peak RSS, and a fitted calibration
   (bench.memory_model).
Larger presets run only when their extrapolated cost fits what is left of --budget-s; what
was skipped is said in the results. --quick: the tiny preset, one round, a few steps.

--quick writes its files as <section>-quick-<date>.md, beside the full results.

Usage: python -m bench [--budget-s 900] [--quick] [--skip-kernels] [--steps 8] [--steps-by-preset medium=3]

DeepSpeed rows need deepspeed importable by the interpreter that runs this (install it apart
from the product: bench/systems/deepspeed.py says how), e.g. /work/dsvenv/bin/python -m bench.
"""

from __future__ import annotations

import argparse
import shlex
import time

from . import memory_model, optimizer_kernels, throughput
from .budget import Budget
from .launch import start_main
from .report import RESULTS, result_path
from .throughput import DEFAULT_SYSTEMS

RESERVE_S = {"memory": 240.0, "kernels": 150.0}
"""Seconds held back from the throughput section for the sections after it (tiny + small
memory rows; the kernel benchmark's default sizes), so a large preset cannot starve them."""
QUICK_RESERVE_S = {"memory": 60.0, "kernels": 20.0}


def sections(args: argparse.Namespace) -> tuple[dict, list[str], list[str]]:
    """(throughput keyword arguments, memory_model argv, optimizer_kernels argv)."""
    if args.quick:  # written beside the full results, never over them
        return (dict(presets=["tiny"], steps=3, warmup=1, reps=1),
                ["--presets", "tiny", "--micro", "1", "4", "--out", str(result_path("memory_model-quick")),
                 "--calibration-out", str(RESULTS / "calibration-cpu-quick.json")],
                ["--sizes", "1e6", "--threads", "1", "--reps", "3",
                 "--out", str(result_path("optimizer_kernels-quick"))])
    return (dict(presets=args.presets, steps=args.steps, warmup=2, reps=args.reps,
                 steps_by_preset=dict(args.steps_by_preset)),
            ["--presets", *args.memory_presets],
            ["--reps", "5", "--out", str(result_path("optimizer_kernels-bench"))])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=900.0, help="wall-clock budget of the whole run")
    p.add_argument("--quick", action="store_true", help="tiny preset, one round, a few steps")
    p.add_argument("--skip-kernels", action="store_true", help="leave out the optimizer-kernel benchmark")
    p.add_argument("--presets", nargs="+", default=["small", "medium"], help="throughput presets")
    p.add_argument("--memory-presets", nargs="+", default=["tiny", "small", "medium"])
    p.add_argument("--reps", type=int, default=2, help="throughput rounds over all systems")
    p.add_argument("--steps", type=int, default=8, help="throughput steps per measurement")
    p.add_argument("--steps-by-preset", nargs="+", default=[], metavar="PRESET=N", type=throughput.preset_steps,
                   help="throughput steps for a preset instead of --steps, e.g. medium=3 (warm-up <= N - 1)")
    args = p.parse_args(argv)
    command, log = start_main("bench", argv)
    budget = Budget(args.budget_s)
    start = time.monotonic()
    tp, memory_argv, kernel_argv = sections(args)

    reserves = QUICK_RESERVE_S if args.quick else RESERVE_S
    reserve = reserves["memory"] + (0 if args.skip_kernels else reserves["kernels"])
    results = throughput.run(systems=DEFAULT_SYSTEMS, budget=Budget(budget.remaining - reserve), log=log, **tp)
    out = result_path("throughput-quick" if args.quick else "throughput")
    written = list(throughput.save(results, command=command, systems=DEFAULT_SYSTEMS, out=out))

    if args.skip_kernels:
        log("[kernels] skipped (--skip-kernels)")
    elif budget.remaining < reserves["kernels"] + reserves["memory"] / 2:
        log("[kernels] skipped: the budget is spent")
    else:
        log(f"[kernels] python -m bench.optimizer_kernels {shlex.join(kernel_argv)}")
        optimizer_kernels.main(kernel_argv)

    memory_model.main(memory_argv, budget=budget, command=command)
    log(f"[bench] done in {time.monotonic() - start:.0f}s; wrote {', '.join(str(w) for w in written)}, "
        "and the memory_model and optimizer_kernels files in bench/results/")


if __name__ == "__main__":
    main()
