"""DeepSpeed's own autotuner on the search space of bench/autotune_efficiency.py.

The same question as zeroplan's tuner benchmark, asked of `deepspeed --autotuning run`: the
small GPT on 2 CPU processes (DS_ACCELERATOR=cpu, gloo), global batch 8, ZeRO stage in
{0, 1, 2, 3} x micro-batch in {1, 2, 4} (gradient accumulation 4 / micro, so the global
batch stays 8, as in zeroplan's grid). DeepSpeed's config says it so:

    "train_micro_batch_size_per_gpu": [1, 2, 4], "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": [0, 1, 2, 3]},
    "autotuning": {"enabled": true, "fast": true, "start_profile_step": 2, "end_profile_step": 3}

(a micro-batch list makes DeepSpeed tune exactly those, with accumulation max(list) / micro;
`fast` keeps it to stage x micro-batch instead of also tuning each stage's bucket sizes,
which zeroplan's grid does not search). Each experiment is one `deepspeed` launch of
bench/deepspeed_experiment.py; DeepSpeed's engine times steps 2-3 (one warm-up step, two measured,
as zeroplan's grid: warmup_steps 1, measured_steps 2), writes the throughput and exits.
Recorded: every experiment's parameters and throughput, the best found, the number of
experiments, and the wall time of the whole command.

Then, in the same run, zeroplan's tuner on the same space with the exhaustive grid sampler
(bench.autotune_efficiency's settings: warmup 1, measured 2 steps, no pruning), so both
tuners' figures come from one stretch of a shared machine (load averages are reported);
--skip-zeroplan leaves it out. bench/results/autotune_efficiency-*.md has zeroplan's TPE.

Needs deepspeed (see bench/systems/deepspeed.py for installing it apart from the product)
and, for DeepSpeed's clean-up after each experiment, `pdsh` (`apt-get install -y pdsh`).
Run with the interpreter that has deepspeed:

    /work/dsvenv/bin/python -m bench.deepspeed_autotune [--model small] [--nproc 2] [--timeout-s 1800]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zeroplan.runtime import procs

from .report import machine_lines, result_path, table, write

from .deepspeed_experiment import END_STEP, START_STEP

SCRIPT = Path(__file__).resolve().parent / "deepspeed_experiment.py"
ROOT = SCRIPT.parent.parent
STAGES = [0, 1, 2, 3]
MICROS = [1, 2, 4]


def autotune_config(*, out: Path) -> dict:
    """The ds_config handed to `deepspeed --autotuning run` (the search space above)."""
    return {
        "train_micro_batch_size_per_gpu": MICROS,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": STAGES},
        "autotuning": {"enabled": True, "fast": True, "tuner_type": "gridsearch", "metric": "throughput",
                       "start_profile_step": START_STEP, "end_profile_step": END_STEP, "overwrite": True,
                       "exps_dir": str(out / "exps"), "results_dir": str(out / "results")},
    }


# -- the tuning run ---------------------------------------------------------------------------
def run_autotuner(*, model: str, nproc: int, out: Path, timeout_s: float) -> tuple[list[str], float, int, str]:
    """Run `deepspeed --autotuning run`; (command, wall seconds, exit code, its output's tail)."""
    config = out / "ds_config.json"
    config.write_text(json.dumps(autotune_config(out=out), indent=1))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_SIZE": str(nproc),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [str(Path(bindir) / "deepspeed"), "--autotuning", "run", "--num_nodes", "1", "--num_gpus", str(nproc),
           str(SCRIPT), "--model", model, "--deepspeed", "--deepspeed_config", str(config)]
    start = time.monotonic()
    log = out / "autotuner.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            procs.signal_group(proc, signal.SIGKILL)
            code = proc.wait()
    tail = procs.tail(log, lines=40)
    return cmd, time.monotonic() - start, code, tail


def experiments(out: Path) -> list[dict]:
    """Every experiment DeepSpeed ran: name, stage, micro, accumulation, throughput (None if it
    wrote none) and seconds from its launch (cmd.txt) to its last log line (stdout.log).

    The throughput is the one DeepSpeed's own summary records where it names the experiment:
    after tuning, `--autotuning run` trains once more with the optimal config, whose
    metric_path is the optimal experiment's metrics.json, so that file holds the final run's
    figure, not the tuning measurement."""
    best = summary_values(out)
    rows = []
    for exp_file in sorted((out / "results").glob("*/exp.json")):
        exp = json.loads(exp_file.read_text())
        cfg, folder = exp["ds_config"], exp_file.parent
        metric = folder / "metrics.json"
        value = json.loads(metric.read_text()).get("throughput") if metric.exists() else None
        value = best.get(exp["name"], value)
        start = (folder / "cmd.txt") if (folder / "cmd.txt").exists() else exp_file
        end = (folder / "stdout.log") if (folder / "stdout.log").exists() else exp_file
        rows.append({"name": exp["name"], "stage": cfg.get("zero_optimization", {}).get("stage"),
                     "micro": cfg.get("train_micro_batch_size_per_gpu"),
                     "accumulation": cfg.get("gradient_accumulation_steps"), "samples_per_s": value,
                     "seconds": end.stat().st_mtime - start.stat().st_mtime,
                     "error": _error_of(folder) if value is None else None})
    return rows


def summary_values(out: Path) -> dict[str, float]:
    """experiment name -> best_metric_val from DeepSpeed's results/summary.txt (its table of the
    best experiment of each tuning space)."""
    path = out / "results" / "summary.txt"
    values = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("z"):
            try:
                values[cells[3]] = float(cells[2])
            except ValueError:
                continue
    return values


def _error_of(exp_dir: Path) -> str | None:
    err = exp_dir / "stderr.log"
    lines = [ln for ln in err.read_text(errors="replace").splitlines() if ln.strip()] if err.exists() else []
    return lines[-1][:200] if lines else None


def run_zeroplan_grid(*, model: str, nproc: int) -> tuple[dict[str, tuple[float, float]], float]:
    """zeroplan's tuner, grid sampler, on the same space: (params -> (samples/s, trial s), wall s)."""
    from zeroplan.autotune.tune import TuneSettings

    from .autotune_efficiency import grid_config, measure_grid

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zeroplan-grid-") as tmp:
        settings = TuneSettings(model_name=model, nproc_per_node=nproc, out_dir=Path(tmp), sampler="grid",
                                pruner="none", max_trials=len(STAGES) * len(MICROS), warmup_steps=1,
                                measured_steps=2, warm_start=0, trial_timeout_s=900)
        grid = measure_grid(data=grid_config(global_batch=8), settings=settings)
    return grid, time.monotonic() - start


def zeroplan_lines(grid: dict[str, tuple[float, float]], wall: float, load: list[float]) -> list[str]:
    if not grid:
        return ["## zeroplan's tuner (grid): no trial completed", ""]
    best_key, (best, _) = max(grid.items(), key=lambda kv: kv[1][0])
    rows = [[k, f"{v:.2f}", f"{s:.0f}"] for k, (v, s) in sorted(grid.items(), key=lambda kv: -kv[1][0])]
    return [f"## zeroplan's tuner on the same space (grid sampler): {len(grid)} trials, wall time {wall:.0f} s", "",
            f"- best: {best_key}: {best:.2f} samples/s",
            "- load average (1 min) at its start and end: " + ", ".join(f"{x:.1f}" for x in load), "",
            *table(["parameters", "samples/s", "trial s"], rows, right=[False, True, True]), ""]


def report(*, args, cmd: list[str], wall: float, code: int, tail: str, rows: list[dict]) -> list[str]:
    measured = [r for r in rows if r["samples_per_s"]]
    best = max(measured, key=lambda r: r["samples_per_s"], default=None)
    lines = ["# DeepSpeed's autotuner on zeroplan's tuning benchmark space", "",
             *machine_lines({"deepspeed": _ds_version()}),
             f"- command: `{sys.executable} -m bench.deepspeed_autotune {shlex.join(sys.argv[1:])}`",
             f"- it runs: `deepspeed --autotuning run --num_nodes 1 --num_gpus {args.nproc} "
             f"bench/deepspeed_experiment.py --model {args.model} --deepspeed --deepspeed_config ds_config.json` "
             f"with DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1, LOCAL_SIZE={args.nproc}",
             f"- model {args.model}, {args.nproc} processes, gloo, global batch 8; space: ZeRO stage {STAGES} x "
             f"micro-batch {MICROS}; steps {START_STEP}-{END_STEP} timed by DeepSpeed's engine "
             "(see the module docstring)", "",
             f"## Result: {_exit(code, wall, args.timeout_s)}, wall time {wall:.0f} s, {len(rows)} experiments run, "
             f"{len(measured)} measured", ""]
    if best:
        lines += [f"- best: ZeRO stage {best['stage']}, micro-batch {best['micro']} "
                  f"(accumulation {best['accumulation']}): {best['samples_per_s']:.2f} samples/s", ""]
    if rows:
        lines += table(["experiment", "stage", "micro", "accumulation", "samples/s", "seconds", "error"],
                       [[r["name"], r["stage"], r["micro"], r["accumulation"],
                         "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.2f}", f"{r['seconds']:.0f}",
                         r["error"] or ""] for r in rows], right=[False, True, True, True, True, True, False])
    summary = out_dir_summary(args)
    if summary:
        lines += ["", "DeepSpeed's own summary (results/summary.txt):", "", *summary]
    lines += ["", "Last lines of the autotuner's output:", "", "```", tail, "```"]
    return lines


def out_dir_summary(args) -> list[str]:
    path = Path(args.out_dir) / "results" / "summary.txt" if getattr(args, "out_dir", None) else None
    return path.read_text().strip().splitlines() if path and path.exists() else []


def _exit(code: int, wall: float, timeout_s: float) -> str:
    if code < 0 and wall >= timeout_s:
        return f"stopped at the --timeout-s limit ({timeout_s:.0f} s), unfinished"
    return f"exit code {code}"


def _ds_version() -> str:
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"not importable ({type(e).__name__}: {e})"
    return deepspeed.__version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.deepspeed_autotune", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--keep", default=None, help="keep DeepSpeed's experiment folders here")
    p.add_argument("--skip-zeroplan", action="store_true", help="leave out zeroplan's grid on the same space")
    args = p.parse_args(argv)
    if shutil.which("pdsh") is None:
        print("note: pdsh is not installed; DeepSpeed's autotuner calls it after each experiment "
              "(apt-get install -y pdsh)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ds-autotune-") as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        args.out_dir = str(out)
        ds_load = [os.getloadavg()[0]]
        cmd, wall, code, tail = run_autotuner(model=args.model, nproc=args.nproc, out=out, timeout_s=args.timeout_s)
        ds_load.append(os.getloadavg()[0])
        rows = experiments(out)
        lines = report(args=args, cmd=cmd, wall=wall, code=code, tail=tail, rows=rows)  # reads out's summary
    lines.insert(lines.index("Last lines of the autotuner's output:") - 1,
                 "\n- load average (1 min) at the autotuner's start and end: "
                 + ", ".join(f"{x:.1f}" for x in ds_load) + f" ({os.cpu_count()} cores)")
    if not args.skip_zeroplan:
        zp_load = [os.getloadavg()[0]]
        grid, zp_wall = run_zeroplan_grid(model=args.model, nproc=args.nproc)
        zp_load.append(os.getloadavg()[0])
        lines += ["", *zeroplan_lines(grid, zp_wall, zp_load)]
    print(write(result_path("deepspeed_autotune"), lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
