"""How many trials does the tuner need? An exhaustive grid as ground truth, then the tuner replayed.

1. `measure MODEL`: the cluster the tuner ranks with is measured first, as `zeroplan autotune
   --cluster auto` does (`zeroplan probe --quick`); then `zeroplan.autotune.tune` with the grid
   sampler measures every point of stage x micro-batch x optimizer offload x degrees x bucket
   size (48 points, `space_config`) at 4 gloo ranks: real `zeroplan train` trials, pruning off,
   1 warm-up and 2 measured steps each. MODEL is the built-in tiny GPT or a small Hugging Face
   Llama (bench/llama_model.py). The measurements go to bench/results/autotune_grid-MODEL-DATE.json.
2. `replay GRID.json ...`: the tuner itself (`ReplayTuner`: its warm start, TPE sampler, plan
   reuse and, when on, the learned cost model's re-ranking after each trial) runs against each
   measured grid for several seeds, each trial answered with the grid's measurement of its plan.
   Counted: trials until a plan within 5% of the grid's best, and the wall time those trials took
   in the grid run. Replaying instead of re-measuring keeps the comparison free of run-to-run
   noise on a shared machine. Variants: warm start alone (the cost model with the probed
   cluster), warm start with the learning cost model (for the Llama also without the overhead
   prior from the model-info run's one-step timing), and plain TPE for reference.
3. The cost model's predicted step time of every grid point, beside the measured one, with its
   median error and the rank correlation (Spearman) between the two.

Usage: python -m bench.autotune_efficiency measure gpt|llama [--nproc 4] [--global-batch 8]
       python -m bench.autotune_efficiency replay bench/results/autotune_grid-*.json [--seeds 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from itertools import product
from dataclasses import dataclass
from pathlib import Path

import optuna

from zeroplan.autotune.cluster import resolve_cluster
from zeroplan.autotune.study import grid_space, make_sampler
from zeroplan.autotune.learned_cost import Ranked, overhead_prior, relative_error
from zeroplan.autotune.models import TrialWorkload, micro_step_seconds, resolve_model
from zeroplan.autotune.runner import TrialOutcome
from zeroplan.autotune.results import trial_dir, trials_frame
from zeroplan.autotune.tune import Tuner, TrialFailed, TuneSettings, plan_key, tune, tune_results
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ClusterSpec, ModelSpec, Plan
from zeroplan.schemas.steps import StepRecord

from .report import RESULTS, machine_lines, result_path, table, write

TARGET = 0.95
GRID_POINTS = 48
UNMEASURED = "not measured in the grid"


MODELS = {"gpt": "tiny", "llama": "bench/llama_model.py:build"}
"""The two workloads of the grid: the built-in tiny GPT and a small Hugging Face Llama from a
config (bench/llama_model.py; `--model module:function`, so the tuner measures its spec)."""


def grid_config(*, global_batch: int) -> dict:
    """Stage x micro-batch (12 points at 2 ranks): the space bench/deepspeed_autotune.py gives
    DeepSpeed's autotuner, which tunes no degrees and no offload."""
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": "auto"},
        "autotuning": {"space": {"zero_optimization.stage": {"choices": [0, 1, 2, 3]},
                                 "train_micro_batch_size_per_gpu": {"choices": [1, 2, 4]}}},
    }


def measure_grid(*, data: dict, settings: TuneSettings,
                 cluster: ClusterSpec = CLUSTER_PRESETS["cpu"]) -> dict[str, tuple[float, float]]:
    """params (JSON) -> (samples/s, trial wall seconds) of every point of a built-in model's
    grid that completed (bench/deepspeed_autotune.py's zeroplan side)."""
    result = tune(data=data, model=MODEL_PRESETS[settings.model_name], cluster=cluster, settings=settings)
    return {json.dumps(p["params"], sort_keys=True): (p["samples_per_s"], p["wall_s"])
            for p in grid_points(result.study) if p["state"] == "complete"}


def space_config(*, global_batch: int) -> dict:
    """stage x micro-batch x optimizer offload x degrees x bucket size: 2 x 2 x 2 x 3 x 2 = 48
    points at 4 processes, every one of them a plan the runtime runs. Stages 1-2 (offload needs
    a stage >= 1); tp 1, 2, 4 at pp 1 (the Llama has no pipeline split, and keeping the same
    space for both models keeps them comparable); buckets of 2e4 and 2e6 elements, below and
    above the models' gradient sizes, so the two values run differently."""
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "auto"},
                              "reduce_bucket_size": "auto"},
        "parallel": {"tp": "auto", "pp": 1},
        "autotuning": {"space": {"zero_optimization.stage": {"choices": [1, 2]},
                                 "train_micro_batch_size_per_gpu": {"choices": [1, 2]},
                                 "zero_optimization.reduce_bucket_size": {"choices": [20_000, 2_000_000]},
                                 "parallel.tp": {"choices": [1, 2, 4]}}},
    }


def grid_points(study: optuna.Study) -> list[dict]:
    """Every finished grid point's measurement: params, samples/s, step seconds, trial wall
    seconds (a point that failed carries its reason instead)."""
    points = []
    for t in study.trials:
        if not t.state.is_finished():
            continue
        point = {"params": t.params, "state": t.state.name.lower(), "wall_s": t.user_attrs.get("wall_s")}
        if t.state == optuna.trial.TrialState.COMPLETE:
            point.update(samples_per_s=t.values[0], step_time_s=t.user_attrs["measured_step_time_s"],
                         peak_bytes=t.user_attrs.get("measured_peak_bytes"))
        else:
            point["reason"] = t.user_attrs.get("reason", "")
        points.append(point)
    return points


def measure(args: argparse.Namespace) -> Path:
    """Measure the grid of `args.model` once into bench/results/autotune_grid-MODEL-DATE.json,
    rewritten after every trial, so a grid stopped early leaves the points it measured; with
    --resume only the points that file lacks are measured (with its cluster), and added. It is
    what `replay` reads."""
    data = space_config(global_batch=args.global_batch)
    out = RESULTS / f"autotune_grid-{args.model}-{dt.date.today().isoformat()}.json"
    root = Path(__file__).resolve().parent.parent
    command = f"python -m bench.autotune_efficiency {shlex.join(sys.argv[1:])}"
    earlier = json.loads(out.read_text()) if args.resume and out.is_file() else None
    record: dict = earlier or {"model": args.model, "workload": MODELS[args.model], "nproc": args.nproc,
                               "global_batch": args.global_batch, "config": data, "command": command,
                               "load_average": [os.getloadavg()[0]], "points": []}
    kept = [p for p in record["points"] if p["state"] == "complete"]
    wall = record.get("grid_wall_s", 0.0)
    if earlier:
        record["command"] = f"{earlier['command']}; then `{command}` for the rest"
    start = time.monotonic()

    def save(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        record.update(grid_wall_s=round(wall + time.monotonic() - start, 1), points=kept + grid_points(study),
                      load_average=record["load_average"][:1] + [os.getloadavg()[0]])
        out.write_text(json.dumps(record, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        if earlier:
            cluster, source = ClusterSpec.model_validate(earlier["cluster"]), earlier["cluster_source"]
        else:
            cluster, source = resolve_cluster(args.cluster, out_dir=Path(tmp), nproc=args.nproc)
        settings = TuneSettings(model_name=MODELS[args.model], nproc_per_node=args.nproc, out_dir=Path(tmp),
                                sampler="random", pruner="none", max_trials=GRID_POINTS, warmup_steps=1,
                                measured_steps=2, warm_start=0, learn=False, trial_timeout_s=600, launch_dir=root)
        model = resolve_model(settings.workload, model_spec=None, out_dir=Path(tmp))
        record.update(model_spec=model.model_dump(mode="json"), cluster=cluster.model_dump(mode="json"),
                      cluster_source=source)
        tuner = Tuner(data=data, model=model, cluster=cluster, settings=settings)
        done = {json.dumps(p["params"], sort_keys=True) for p in kept}
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
        for values in product(*grid_space(tuner.dims).values()):  # every point, in the grid's order
            params = dict(zip(grid_space(tuner.dims), values))
            if json.dumps(params, sort_keys=True) not in done:
                study.enqueue_trial(params)
        start = time.monotonic()
        study.optimize(tuner.objective, n_trials=len(study.trials), catch=(TrialFailed,), callbacks=[save])
    return out


class ReplayTuner(Tuner):
    """The tuner itself (warm start, sampler, the learned model's re-ranking, plan reuse), with
    each trial's run answered from the measured grid instead of a new `zeroplan train`."""

    def __init__(self, *, grid: list[dict], **kwargs):
        super().__init__(**kwargs)
        self.points = {plan_key(self.candidate(p["params"]).plan): p for p in grid}
        self.wall_s = 0.0

    def ranked(self) -> list[Ranked]:
        """What the warm start and the learned model choose from: the measured points only (a
        grid stopped early is the replay's whole space; the sampler's other points are no trial)."""
        return [r for r in super().ranked() if r.key in self.points]

    def _run(self, trial: optuna.Trial, plan: Plan) -> TrialOutcome:
        point = self.points.get(plan_key(plan))
        if point is None:  # a grid stopped early: the replay's space is the points it measured
            return TrialOutcome("pruned", UNMEASURED)
        if point["state"] != "complete":
            return TrialOutcome("failed", point.get("reason") or "failed in the grid run")
        self.wall_s += point["wall_s"] or 0.0
        plan.save(trial_dir(self.settings.out_dir, trial.study.study_name, trial.number) / "plan.json")
        step = StepRecord(step=self.settings.warmup_steps + 1, step_time_s=point["step_time_s"])
        return TrialOutcome("complete", steps=[step], wall_s=point["wall_s"] or 0.0,
                            peak_memory_bytes=point.get("peak_bytes"))


def replay(*, record: dict, model: ModelSpec, cluster: ClusterSpec, seed: int, warm_start: int,
           learn: bool, report_dir: Path | None = None, report_trials: int = 12) -> Replayed:
    """Trials, and the grid wall time of those that ran, until the tuner reaches TARGET x the
    grid's best (a repeated plan is a trial, reused at no wall time, as in a real study; a plan
    the grid did not measure is no trial). With
    `report_dir`, the study runs on to `report_trials` trials and the tuner's results of it go
    there (trials.csv, report.html)."""
    points = [p for p in record["points"] if p["state"] == "complete"]
    best = max(p["samples_per_s"] for p in points)
    with tempfile.TemporaryDirectory() as tmp:
        settings = TuneSettings(model_name=record["workload"], nproc_per_node=record["nproc"],
                                out_dir=report_dir or Path(tmp),
                                warm_start=warm_start, learn=learn, max_trials=10 * len(points), warmup_steps=1,
                                measured_steps=1, pruner="none")
        tuner = ReplayTuner(grid=record["points"], data=record["config"], model=model, cluster=cluster,
                            settings=settings)
        study = optuna.create_study(study_name=f"replay-{record['model']}-seed{seed}{'-learning' if learn else ''}",
                                    direction="maximize", sampler=make_sampler("tpe", dims=tuner.dims, seed=seed))
        tuner.warm_start(study, budget=settings.max_trials)
        n, seen = 0, 0
        while n < settings.max_trials:
            study.optimize(tuner.objective, n_trials=1, catch=(TrialFailed,), callbacks=[tuner.after_trial])
            finished = [t for t in study.trials if t.state.is_finished()]  # enqueued ones run first
            (last,) = finished[seen:]
            seen += 1
            n += last.user_attrs.get("reason") != UNMEASURED
            if last.value is not None and last.value >= TARGET * best:
                break
        if report_dir is not None:
            study.optimize(tuner.objective, n_trials=max(report_trials - n, 0), catch=(TrialFailed,),
                           callbacks=[tuner.after_trial])
            tune_results(study, tuner=tuner)
        errors = [abs(e) for e in trials_frame(study)["prediction_error"].dropna()]
    return Replayed(n, tuner.wall_s, errors)


@dataclass(frozen=True)
class Replayed:
    trials: int
    """Trials until a plan within 5% of the grid's best."""
    wall_s: float
    """The grid run's wall time of those trials."""
    errors: list[float]
    """|relative error| of each trial's predicted step (the learned model's when it learns)."""


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


def model_of(record: dict, *, out_dir: Path) -> tuple[ModelSpec, float | None]:
    """The grid's model spec and, for a model function, the model-info run's one-micro-step
    timing at a rank's share of the cores (measured now: cheap, and what a tune would do)."""
    spec = ModelSpec.model_validate(record["model_spec"])
    if record["workload"] in MODEL_PRESETS:
        return spec, None
    workload = TrialWorkload(model=record["workload"], cwd=Path(__file__).resolve().parent.parent)
    threads = max((os.cpu_count() or 1) // record["nproc"], 1)
    resolve_model(workload, model_spec=None, out_dir=out_dir, threads=threads)
    return spec, micro_step_seconds(out_dir, model=record["workload"])


def analyse(record: dict, *, seeds: int, report_dir: Path | None) -> dict:
    """The replays of one measured grid: warm start alone, and with the learned cost model."""
    cluster = ClusterSpec.model_validate(record["cluster"])
    with tempfile.TemporaryDirectory() as tmp:
        model, micro_step = model_of(record, out_dir=Path(tmp))
    primed = cluster if micro_step is None else overhead_prior(cluster, model, micro_step_s=micro_step)
    variants = {"TPE + warm start (cost model ranked with the probed cluster)": (cluster, 3, False),
                "TPE + warm start + learning cost model": (primed, 3, True)}
    if micro_step is not None:
        variants["TPE + warm start + learning, without the one-step overhead prior"] = (cluster, 3, True)
    variants["plain TPE (no warm start, no learning)"] = (cluster, 0, False)
    runs = {name: [replay(record=record, model=model, cluster=c, seed=seed, warm_start=w, learn=learn)
                   for seed in range(seeds)] for name, (c, w, learn) in variants.items()}
    if report_dir is not None:  # the learning tuner's study of seed 0
        replay(record=record, model=model, cluster=primed, seed=0, warm_start=3, learn=True,
               report_dir=report_dir / record["model"])
    return {"runs": runs, "cluster": cluster, "primed": primed, "model": model, "micro_step": micro_step}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.autotune_efficiency", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure one model's grid into bench/results/autotune_grid-MODEL-DATE.json")
    m.add_argument("model", choices=sorted(MODELS))
    m.add_argument("--nproc", type=int, default=4)
    m.add_argument("--global-batch", type=int, default=8)
    m.add_argument("--cluster", default="auto", help="what the warm start ranks with (default: probed now)")
    m.add_argument("--resume", action="store_true", help="measure only the points the grid's file lacks")
    r = sub.add_parser("replay", help="replay the tuner against measured grids; writes the results file")
    r.add_argument("grids", nargs="+", type=Path, help="autotune_grid-*.json files from `measure`")
    r.add_argument("--seeds", type=int, default=10)
    r.add_argument("--report", type=Path, help="write the learning tuner's results of seed 0 (report.html) "
                   "into DIR/MODEL")
    args = p.parse_args(argv)
    if args.command == "measure":
        print(measure(args))
        return
    records = [json.loads(path.read_text()) for path in args.grids]
    results = {path: analyse(rec, seeds=args.seeds, report_dir=args.report) for path, rec in zip(args.grids, records)}
    print(write(result_path("autotune_efficiency"), report_lines(args=args, records=records, results=results)))


def report_lines(*, args, records: list[dict], results: dict) -> list[str]:
    lines = ["# Autotune efficiency: the tuner replayed against measured exhaustive grids", "",
             *machine_lines({}), f"- command: `python -m bench.autotune_efficiency {shlex.join(sys.argv[1:])}`", "",
             "See the module docstring for the method: each grid measured once, the tuner replayed against it for "
             f"{args.seeds} seeds; counted: trials until a plan within {1 - TARGET:.0%} of the grid's best.", ""]
    for (path, result), record in zip(results.items(), records):
        lines += grid_lines(path=path, record=record, result=result)
    return lines


def grid_lines(*, path: Path, record: dict, result: dict) -> list[str]:
    points = [p for p in record["points"] if p["state"] == "complete"]
    best = max(p["samples_per_s"] for p in points)
    model, cluster = result["model"], result["cluster"]
    tuner = Tuner(data=record["config"], model=model, cluster=cluster,
                  settings=TuneSettings(model_name=record["workload"], nproc_per_node=record["nproc"]))
    rows, predicted, measured, errors = [], [], [], []
    for p in sorted(points, key=lambda p: -p["samples_per_s"]):
        plan = tuner.candidate(p["params"]).plan
        step = plan.estimates.predicted_step_time_s
        predicted.append(plan.batch.global_batch_size / step)
        measured.append(p["samples_per_s"])
        errors.append(abs(relative_error(predicted_s=step, measured_s=p["step_time_s"])))
        rows.append((_short(p["params"]), f"{p['samples_per_s']:.2f}", f"{p['samples_per_s'] / best:.2f}",
                     f"{p['wall_s']:.0f}", f"{step:.3f}", f"{p['step_time_s']:.3f}"))
    r, n = cluster.rates, len(record["points"])
    failed = [p for p in record["points"] if p["state"] != "complete"]
    lines = [f"## {record['model']}: `{record['workload']}`, {record['nproc']} gloo ranks, global batch "
             f"{record['global_batch']}", "",
             f"- grid: {path.name}, measured by `{record['command']}`; {n} of {GRID_POINTS} points measured, "
             f"{len(points)} complete"
             + (f", {len(failed)} failed ({failed[0].get('reason', '')[:120]})" if failed else "")
             + f"; {record['grid_wall_s']:.0f} s; load average (1 min) before / after "
             f"{record['load_average'][0]:.1f} / {record['load_average'][-1]:.1f} on {os.cpu_count()} cores",
             f"- cluster: {record['cluster_source']}: matmul {r.matmul_flops_fp32 / 1e9:.3g} GFLOP/s, all-reduce "
             f"{r.intra_node_bandwidth / 1e9:.3g} GB/s, latency {r.intra_node_latency * 1e6:.0f} us per ring step, "
             f"overhead {r.micro_step_overhead * 1e3:.2g} ms per micro-step + {r.layer_overhead * 1e3:.2g} ms "
             "per block"]
    if result["micro_step"] is not None:
        q = result["primed"].rates
        lines.append(f"- model-info run: one micro-step (micro-batch 1) {result['micro_step'] * 1e3:.1f} ms; the "
                     f"learning variant's overhead prior: {q.micro_step_overhead * 1e3:.2g} ms per micro-step + "
                     f"{q.layer_overhead * 1e3:.2g} ms per block")
    lines += ["", f"Cost model (probed cluster): median |error| of the predicted step "
              f"{statistics.median(errors):.0%}; rank correlation (Spearman) of predicted and measured throughput "
              f"{spearman(measured, predicted):.2f}.", "",
              f"### Trials to within {1 - TARGET:.0%} of the best, {len(next(iter(result['runs'].values())))} seeds "
              f"(space: {len(points)} points; target: at most {0.1 * len(points):.1f}, 10% of the space)", "",
              *table(["variant", "median trials", "share of space", "min", "max", "median wall s",
                      "median abs. step error", "per seed"],
                     [_variant_row(name, runs, space=len(points)) for name, runs in result["runs"].items()],
                     right=[False, True, True, True, True, True, True, False]), "",
              "### The grid", "",
              *table(["parameters", "samples/s", "vs best", "trial s", "predicted step s", "measured step s"], rows,
                     right=[False, True, True, True, True, True]), ""]
    return lines


def _variant_row(name: str, runs: list[Replayed], *, space: int) -> tuple:
    trials = [r.trials for r in runs]
    errors = [e for r in runs for e in r.errors]
    return (name, f"{statistics.median(trials):g}", f"{statistics.median(trials) / space:.1%}", min(trials),
            max(trials), f"{statistics.median(r.wall_s for r in runs):.0f}",
            f"{statistics.median(errors):.0%}" if errors else "-", " ".join(map(str, trials)))


_SHORT = {"train_micro_batch_size_per_gpu": "mb", "zero_optimization.stage": "stage",
          "zero_optimization.offload_optimizer.device": "offload", "zero_optimization.reduce_bucket_size": "bucket",
          "parallel.degrees": "dp.tp.pp"}


def _short(params: dict) -> str:
    return ", ".join(f"{_SHORT.get(k, k)} {v}" for k, v in params.items())


if __name__ == "__main__":
    main()
