"""How many trials does the tuner need? An exhaustive grid as ground truth, then TPE replayed.

1. Ground truth: `zeroplan.autotune.tune` with the grid sampler measures every candidate of
   stage x micro-batch on the built-in GPT (real `zeroplan train` trials, 2 gloo ranks, pruning
   off, so every point is measured in full). Offload is not in the grid: the runtime refuses
   offload plans until the offload work lands, so those trials could only fail.
2. TPE with warm start, replayed against the measured grid for several seeds: the tuner's own
   sampler and warm start (the cost model's top candidates enqueued first) ask for points, and
   each answer is the grid's measurement of that point. Counted: trials until a plan within 5%
   of the grid's best is found, and the wall time those trials took in the grid run. Replaying
   instead of re-measuring keeps the comparison free of run-to-run noise on a shared machine; it
   ignores pruning, so the wall time is an upper bound.

Usage: python -m bench.autotune_efficiency [--model small] [--nproc 2] [--seeds 10]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import optuna

from zeroplan.autotune.space import suggest
from zeroplan.autotune.study import make_sampler
from zeroplan.autotune.tune import Tuner, TuneSettings, tune
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS

from .report import machine_lines, result_path, table, write

TARGET = 0.95


def grid_config(*, global_batch: int) -> dict:
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": "auto"},
        "autotuning": {"space": {"zero_optimization.stage": {"choices": [0, 1, 2, 3]},
                                 "train_micro_batch_size_per_gpu": {"choices": [1, 2, 4]}}},
    }


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def measure_grid(*, data: dict, settings: TuneSettings) -> dict[str, tuple[float, float]]:
    """params -> (samples/s, trial wall seconds) for every grid point that completed."""
    result = tune(data=data, model=MODEL_PRESETS[settings.model_name], cluster=CLUSTER_PRESETS["cpu"],
                  settings=settings)
    return {_key(t.params): (t.values[0], t.user_attrs["wall_s"]) for t in result.study.trials
            if t.state == optuna.trial.TrialState.COMPLETE}


def replay_tpe(*, data: dict, settings: TuneSettings, grid: dict[str, tuple[float, float]],
               seed: int) -> tuple[int, float]:
    """Trials and grid wall time TPE (with warm start) needs to reach TARGET x the grid's best."""
    best = max(v for v, _ in grid.values())
    tuner = Tuner(data=data, model=MODEL_PRESETS[settings.model_name], cluster=CLUSTER_PRESETS["cpu"],
                  settings=settings)
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", dims=tuner.dims, seed=seed))
    tuner.warm_start(study)
    wall = 0.0
    for n in range(1, 10 * len(grid) + 1):
        trial = study.ask()
        value, seconds = grid.get(_key(suggest(trial, tuner.dims, config=tuner.config)), (0.0, 0.0))
        study.tell(trial, value)
        wall += seconds
        if value >= TARGET * best:
            return n, wall
    return 10 * len(grid), wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.autotune_efficiency", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=10)
    args = p.parse_args(argv)
    data = grid_config(global_batch=args.global_batch)
    with tempfile.TemporaryDirectory() as tmp:
        settings = TuneSettings(model_name=args.model, nproc_per_node=args.nproc, out_dir=Path(tmp), sampler="grid",
                                pruner="none", max_trials=12, warmup_steps=1, measured_steps=2, warm_start=0,
                                trial_timeout_s=900)
        grid = measure_grid(data=data, settings=settings)
    runs = [replay_tpe(data=data, settings=TuneSettings(model_name=args.model, nproc_per_node=args.nproc,
                                                        out_dir=Path("."), warm_start=3), grid=grid, seed=s)
            for s in range(args.seeds)]
    write_report(args=args, grid=grid, runs=runs)


def write_report(*, args, grid: dict[str, tuple[float, float]], runs: list[tuple[int, float]]) -> None:
    best = max(v for v, _ in grid.values())
    grid_wall = sum(s for _, s in grid.values())
    rows = [(k, f"{v:.2f}", f"{v / best:.2f}", f"{s:.0f}") for k, (v, s) in sorted(grid.items(), key=lambda kv: -kv[1][0])]
    trials = [n for n, _ in runs]
    walls = [w for _, w in runs]
    lines = ["# Autotune efficiency: TPE with warm start against an exhaustive grid", "", *machine_lines({}),
             f"- command: `python -m bench.autotune_efficiency {shlex.join(sys.argv[1:])}`".rstrip(),
             f"- model {args.model}, {args.nproc} gloo ranks, global batch {args.global_batch}; "
             "see the module docstring for the method (grid measured, TPE replayed)", "",
             f"## Grid: {len(grid)} trials measured, {grid_wall:.0f} s", "",
             *table(["parameters", "samples/s", "vs best", "trial s"], rows, right=[False, True, True, True]), "",
             f"## TPE with warm start, {len(runs)} seeds: trials to reach {TARGET:.0%} of the grid's best", "",
             f"- trials: median {statistics.median(trials)}, min {min(trials)}, max {max(trials)} "
             f"(grid: {len(grid)}; target: at most {len(grid) / 3:.1f})",
             f"- wall time of those trials: median {statistics.median(walls):.0f} s "
             f"(grid: {grid_wall:.0f} s)", f"- per seed: {trials}"]
    print(write(result_path("autotune_efficiency"), lines))


if __name__ == "__main__":
    main()
