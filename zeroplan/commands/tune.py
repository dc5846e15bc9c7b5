"""`zeroplan autotune` and `zeroplan report`.

SIGTERM or Ctrl-C stops what the tuner is running (the model measurement, the probe, or a
trial, its ranks included, which it marks failed) and ends the tuner with status 130 (SIGINT)
or 143 (SIGTERM); the same command resumes the study.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.schemas import ConfigError, apply_overrides, read_config_file, validate_config
from zeroplan.schemas.autotuning import OBJECTIVES, SAMPLERS
from zeroplan.schemas.paths import writable_dir

from .common import user_errors



def _choice(value: str | None, allowed: tuple[str, ...], option: str) -> str | None:
    if value is not None and value not in allowed:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(allowed)}")
    return value


@user_errors
def autotune(
    config: Annotated[Path, typer.Argument(help="Config with 'auto' knobs or an autotuning.space block.")],
    script_args: Annotated[Optional[list[str]], typer.Argument(
        help="After `--`: arguments of the --script.", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="What trials train: a built-in preset (tiny, small, medium), or "
                                       "module:function returning (model, get_batch).")] = "tiny",
    script: Annotated[Optional[Path], typer.Option(help="Your training script (it calls zeroplan.initialize); "
                                                   "trials run it instead of --model.")] = None,
    model_spec: Annotated[Optional[str], typer.Option("--model-spec", help="Model shape for the estimates (a "
                                                      "preset or ModelSpec JSON); default: measured.")] = None,
    cluster: Annotated[str, typer.Option(help="Cluster preset, cluster.json, or auto: this machine, measured "
                                         "(cluster.json here, else a quick probe into --out).")] = "auto",
    nnodes: Annotated[int, typer.Option(min=1)] = 1,
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", min=1)] = 2,
    max_trials: Annotated[Optional[int], typer.Option(min=1, help="Default: autotuning.max_trials.")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Study budget in seconds.")] = None,
    trial_timeout: Annotated[Optional[float], typer.Option(help="Per-trial limit in seconds.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL; default SQLite in --out.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results directory; default autotuning.results_dir.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help=" | ".join(SAMPLERS))] = None,
    objective: Annotated[Optional[str], typer.Option(help=" | ".join(OBJECTIVES))] = None,
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="Resume the study of the same name, "
                                         "or start a new one beside it (nothing is deleted).")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: dotted.key=value.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Tuner processes on this machine sharing the study. On other "
                                         "nodes, the same command with the same --storage joins it.")] = 1,
    learn: Annotated[bool, typer.Option("--learn/--no-learn", help="Refit the cost model to each trial and try its "
                                        "best untried plan next (autotune/learned_cost.py).")] = True,
) -> None:
    """Search ZeRO stage, micro-batch, offload and degrees by measuring short runs."""
    from zeroplan.autotune.cluster import resolve_cluster
    from zeroplan.autotune.learned_cost import overhead_prior
    from zeroplan.autotune.models import micro_step_seconds, resolve_model
    from zeroplan.autotune.progress import live_progress
    from zeroplan.autotune.tune import TuneSettings, tune

    data = apply_overrides(read_config_file(config), set_ or ())
    block = validate_config(copy.deepcopy(data), source=str(config)).autotuning
    if script_args and script is None:
        raise ConfigError(f"arguments after `--` ({' '.join(script_args)}) are for a --script; none was given")
    if script is not None and not script.is_file():
        raise ConfigError(f"--script {script}: no such file")
    out_dir = writable_dir(out, key="--out") if out else writable_dir(block.results_dir, key="autotuning.results_dir")
    settings = TuneSettings(
        model_name=model, nnodes=nnodes, nproc_per_node=nproc_per_node, launch_dir=Path.cwd(),
        script=(str(script), *(script_args or ())) if script is not None else (),
        out_dir=out_dir,
        objective=_choice(objective, tuple(OBJECTIVES), "--objective") or block.metric,
        max_trials=max_trials or block.max_trials, timeout_s=timeout or block.time_budget_s,
        trial_timeout_s=trial_timeout or block.trial_timeout_s, warmup_steps=block.warmup_steps,
        measured_steps=block.measured_steps, storage=storage or block.storage, study_name=block.study_name,
        sampler=_choice(sampler, SAMPLERS, "--sampler") or block.sampler, pruner=block.pruner,
        memory_safety_margin=block.memory_safety_margin, seed=block.seed,
        overwrite=not resume or block.overwrite, learn=learn)
    with _interruptible():
        spec = resolve_model(settings.workload, model_spec=model_spec, out_dir=settings.out_dir,
                             threads=max((os.cpu_count() or 1) // nproc_per_node, 1))
        machines, source = resolve_cluster(cluster, out_dir=settings.out_dir, nproc=nproc_per_node)
        micro_step = None if model_spec or script else micro_step_seconds(settings.out_dir, model=model)
        if micro_step is not None and learn:
            machines = overhead_prior(machines, spec, micro_step_s=micro_step)
            source += (f"; overheads primed by one micro-step of the model ({micro_step * 1e3:.1f} ms): "
                       f"{machines.rates.micro_step_overhead * 1e3:.2g} ms per micro-step + "
                       f"{machines.rates.layer_overhead * 1e3:.2g} ms per block")
        typer.echo(f"model {spec.name}: {spec.total_params:,} parameters; cluster {machines.name}: {source}")
        notify = lambda text: typer.echo(f"notice: {text}", err=True)  # noqa: E731
        if workers > 1:
            result = _tune_workers(workers, data=data, model=spec, cluster=machines, settings=settings, notify=notify)
        else:
            with live_progress(total=settings.max_trials) as callback:
                result = tune(data=data, model=spec, cluster=machines, settings=settings, callbacks=[callback],
                              notify=notify)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items()))
    typer.echo(f"study {result.study.study_name}: {counts}")
    if result.best_plan is None:
        typer.echo(f"no trial completed; reasons in {result.out_dir / 'report.md'}", err=True)
        raise typer.Exit(1)
    typer.echo(f"best plan: {result.out_dir / 'best_plan.json'} "
               f"({result.best_plan.provenance.measured_samples_per_s:.2f} samples/s)")


def _tune_workers(workers: int, **kwargs):
    """`--workers N`: N tuner processes on one study (autotune/workers.py); says which ended badly."""
    from zeroplan.autotune.workers import tune_workers

    typer.echo(f"{workers} tuner workers on one study")
    result, statuses = tune_workers(workers=workers, **kwargs)
    for i, status in enumerate(statuses):
        if status:
            typer.echo(f"tuner worker {i} ended with status {status}; the others finished the study", err=True)
    return result


@contextlib.contextmanager
def _interruptible():
    """Run the tuner; SIGTERM is raised as Ctrl-C is, and the running child (the model
    measurement, the probe or a trial: autotune/child.py) is stopped on its way out (Optuna
    marks a running trial failed); either says how to resume and exits 128 + the signal."""
    received = [signal.SIGINT]

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"interrupted by {signal.Signals(received[-1]).name}: what was running was stopped (a trial "
                   "is marked failed); run the same command to resume the study", err=True)
        raise typer.Exit(128 + received[-1]) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@user_errors
def report(
    directory: Annotated[Path, typer.Argument(help="Results directory of `zeroplan autotune`.")],
    storage: Annotated[Optional[str], typer.Option(help="Storage URL; default the directory's study.db.")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name; default the only (or newest) one.")] = None,
    objective: Annotated[str, typer.Option(help=" | ".join(OBJECTIVES))] = "throughput",
) -> None:
    """Re-render trials.csv, report.md, report.html and best_plan.json from a stored study."""
    import optuna

    from zeroplan.autotune.results import write_results
    from zeroplan.autotune.storage import masked, open_storage, readable_storage, storage_url

    if storage is None and not (directory / "study.db").is_file():
        raise ConfigError(f"no study.db in {directory}; pass --storage for a study stored elsewhere")
    url = storage_url(storage, results_dir=directory)
    rdb = open_storage(url)
    with readable_storage(url, also=(ImportError, ValueError, RuntimeError)):
        summaries = optuna.get_all_study_summaries(storage=rdb)
        if not summaries:
            raise ConfigError(f"no study in {masked(url)}")
        name = study or max(summaries, key=lambda s: s.datetime_start or datetime.datetime.min).study_name
        loaded = optuna.load_study(study_name=name, storage=rdb)
    write_results(loaded, out_dir=directory, objective=_choice(objective, tuple(OBJECTIVES), "--objective"))
    typer.echo(f"wrote {directory / 'report.md'} for study {name}")
