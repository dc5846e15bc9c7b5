"""How many trials does the tuner need? An exhaustive grid as ground truth, then TPE replayed.

0. The cluster the tuner ranks with is measured first, as `zeroplan autotune --cluster auto`
   does (`zeroplan probe --quick`), unless --cluster names one.
1. Ground truth: `zeroplan.autotune.tune` with the grid sampler measures every candidate of
   stage x micro-batch on the built-in GPT (real `zeroplan train` trials, 2 gloo ranks, pruning
   off, so every point is measured in full). Offload is not in the grid: the runtime refuses
   offload plans until the offload work lands, so those trials could only fail.
2. TPE with warm start, replayed against the measured grid for several seeds: the tuner's own
   sampler and warm start (the cost model's top candidates enqueued first) ask for points, and
   each answer is the grid's measurement of that point. Counted: trials until a plan within 5%
   of the grid's best is found, and the wall time those trials took in the grid run. Replaying
   instead of re-measuring keeps the comparison free of run-to-run noise on a shared machine; it
   ignores pruning, so the wall time is an upper bound. For reference the same replay runs with
   the warm start ranked by the nominal `cpu` preset, and with no warm start (plain TPE).
3. The cost model's predicted step time of every grid point, beside the measured one, with the
   rank correlation (Spearman) between the two.

Usage: python -m bench.autotune_efficiency [--model small] [--nproc 2] [--seeds 10] [--cluster auto]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import optuna

from zeroplan.autotune.cluster import resolve_cluster
from zeroplan.autotune.space import suggest
from zeroplan.autotune.study import make_sampler
from zeroplan.autotune.tune import Tuner, TuneSettings, tune
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ClusterSpec

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


def measure_grid(*, data: dict, settings: TuneSettings, cluster: ClusterSpec) -> dict[str, tuple[float, float]]:
    """params -> (samples/s, trial wall seconds) for every grid point that completed."""
    result = tune(data=data, model=MODEL_PRESETS[settings.model_name], cluster=cluster, settings=settings)
    return {_key(t.params): (t.values[0], t.user_attrs["wall_s"]) for t in result.study.trials
            if t.state == optuna.trial.TrialState.COMPLETE}


def replay_tpe(*, data: dict, settings: TuneSettings, grid: dict[str, tuple[float, float]], seed: int,
               cluster: ClusterSpec) -> tuple[int, float]:
    """Trials and grid wall time TPE (warm-started when settings.warm_start) needs to reach TARGET x the best."""
    best = max(v for v, _ in grid.values())
    tuner = Tuner(data=data, model=MODEL_PRESETS[settings.model_name], cluster=cluster, settings=settings)
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


def predictions(*, data: dict, settings: TuneSettings, grid: dict, cluster: ClusterSpec) -> dict[str, float]:
    """params -> the cost model's predicted seconds per sample."""
    tuner = Tuner(data=data, model=MODEL_PRESETS[settings.model_name], cluster=cluster, settings=settings)
    out = {}
    for key in grid:
        plan = tuner.candidate(json.loads(key)).plan
        out[key] = plan.estimates.predicted_step_time_s / plan.batch.global_batch_size
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.autotune_efficiency", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--cluster", default="auto", help="what the warm start ranks with (default: probed now)")
    args = p.parse_args(argv)
    data = grid_config(global_batch=args.global_batch)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        cluster, source = resolve_cluster(args.cluster, out_dir=Path(tmp), nproc=args.nproc)
        settings = TuneSettings(model_name=args.model, nproc_per_node=args.nproc, out_dir=Path(tmp), sampler="grid",
                                pruner="none", max_trials=12, warmup_steps=1, measured_steps=2, warm_start=0,
                                trial_timeout_s=900)
        grid = measure_grid(data=data, settings=settings, cluster=cluster)
    load.append(os.getloadavg()[0])
    replay = TuneSettings(model_name=args.model, nproc_per_node=args.nproc, out_dir=Path("."), warm_start=3)
    variants = {
        f"warm start ranked with the measured cluster ({source})": (replay, cluster),
        "warm start ranked with the nominal `cpu` preset": (replay, CLUSTER_PRESETS["cpu"]),
        "no warm start (plain TPE)": (TuneSettings(model_name=args.model, nproc_per_node=args.nproc,
                                                   out_dir=Path("."), warm_start=0), cluster)}
    runs = {name: [replay_tpe(data=data, settings=s, grid=grid, seed=seed, cluster=c) for seed in range(args.seeds)]
            for name, (s, c) in variants.items()}
    predicted = predictions(data=data, settings=replay, grid=grid, cluster=cluster)
    write_report(args=args, grid=grid, runs=runs, predicted=predicted, cluster=cluster, source=source, load=load)


def write_report(*, args, grid: dict[str, tuple[float, float]], runs: dict[str, list[tuple[int, float]]],
                 predicted: dict[str, float], cluster: ClusterSpec, source: str, load: list[float]) -> None:
    best = max(v for v, _ in grid.values())
    grid_wall = sum(s for _, s in grid.values())
    rows = [(k, f"{v:.2f}", f"{v / best:.2f}", f"{s:.0f}", f"{1 / predicted[k]:.2f}")
            for k, (v, s) in sorted(grid.items(), key=lambda kv: -kv[1][0])]
    rho = spearman([v for v, _ in grid.values()], [1 / predicted[k] for k in grid])
    r = cluster.rates
    lines = ["# Autotune efficiency: TPE with warm start against an exhaustive grid", "", *machine_lines({}),
             f"- load average (1 min) before / after the grid: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} "
             "cores (other jobs on the machine)",
             f"- command: `python -m bench.autotune_efficiency {shlex.join(sys.argv[1:])}`".rstrip(),
             f"- model {args.model}, {args.nproc} gloo ranks, global batch {args.global_batch}; "
             "see the module docstring for the method (grid measured, TPE replayed)",
             f"- cluster the warm start ranks with: {source}: matmul {r.matmul_flops_fp32 / 1e9:.3g} GFLOP/s, "
             f"copy {r.memory_bandwidth / 1e9:.3g} GB/s, all-reduce {r.intra_node_bandwidth / 1e9:.3g} GB/s, "
             + ", ".join(f"{op} {bw / 1e9:.3g} GB/s" for op, bw in r.intra_node_collective_bandwidth.items())
             + f", latency {r.intra_node_latency * 1e6:.0f} us per ring step, overhead "
             f"{r.micro_step_overhead * 1e3:.2g} ms per micro-step + {r.layer_overhead * 1e3:.2g} ms per block", "",
             f"## Grid: {len(grid)} trials measured, {grid_wall:.0f} s", "",
             *table(["parameters", "samples/s", "vs best", "trial s", "predicted samples/s"], rows,
                    right=[False, True, True, True, True]), "",
             f"Rank correlation (Spearman) of predicted and measured throughput: {rho:.2f}.", "",
             f"## Trials to reach {TARGET:.0%} of the grid's best, {args.seeds} seeds "
             f"(grid: {len(grid)}; target: at most {len(grid) / 3:.1f})", ""]
    for name, result in runs.items():
        trials, walls = [n for n, _ in result], [w for _, w in result]
        lines += [f"- {name}: median {statistics.median(trials)}, min {min(trials)}, max {max(trials)}; "
                  f"wall time of those trials median {statistics.median(walls):.0f} s (grid: {grid_wall:.0f} s); "
                  f"per seed {trials}"]
    print(write(result_path("autotune_efficiency"), lines))


if __name__ == "__main__":
    main()
