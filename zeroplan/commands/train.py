"""`zeroplan train`: run training under a plan (the built-in model, your model, or your script).

A failed run ends with the cause the ranks reported (runtime/diagnose.py) on one line, status
1; a user error found by a rank (a ConfigError) is printed as any user error, status 2. A plan
`zeroplan autotune` wrote for one model is refused, status 2, for another (its measurements
and estimates are that model's): autotune/identity.py says how models are compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.schemas import ConfigError, Plan, Problem
from zeroplan.runtime.pipeline_support import check_pipeline
from zeroplan.schemas.paths import writable_file

from .common import user_errors


@user_errors
def train(
    plan: Annotated[Path, typer.Argument(help="plan.json from `zeroplan compile`.", show_default=False)],
    script: Annotated[Optional[list[str]], typer.Argument(
        help="After `--`: a training script and its arguments; it calls zeroplan.initialize(model).",
        show_default=False)] = None,
    model: Annotated[str, typer.Option("--model", help="Built-in GPT preset (tiny, small, medium), or "
                                       "module:function returning (model, get_batch).")] = "tiny",
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps (default 20). With a "
                                                 "script: engine.step() ends the run after N steps.")] = None,
    metrics: Annotated[Optional[Path], typer.Option(
        "--metrics", help="Write per-step metrics as JSON lines (rank 0).")] = None,
) -> None:
    """Launch the plan's processes (torchrun; none for one process) and train."""
    if not plan.is_file():
        raise ConfigError(Problem("", f"plan file {plan} not found", suggestion="run `zeroplan compile` first"))
    loaded = Plan.load(plan)  # a plan that does not load is reported here, before any process starts
    try:
        check_pipeline(loaded)  # a pipeline this runtime cannot run, too
    except ConfigError as e:
        raise ConfigError(e.problems, source=str(plan)) from e
    _refuse_another_model(loaded, path=plan, model=model, script=script)
    if metrics is not None:
        metrics = writable_file(metrics, key="--metrics").resolve()
    from zeroplan.runtime.launch import launch  # torch: after the checks, which answer at once
    from zeroplan.runtime.run_env import MAX_STEPS_ENV, METRICS_ENV

    env = {}
    if script:
        target, module = list(script), False
        if steps is not None:
            env[MAX_STEPS_ENV] = str(steps)
        if metrics is not None:
            env[METRICS_ENV] = str(metrics)
    else:
        target = ["zeroplan.runtime.train", "--plan", str(plan), "--model", model, "--steps", str(steps or 20)]
        if metrics is not None:
            target += ["--metrics", str(metrics)]
        module = True
    failure = launch(plan_path=plan, target=target, module=module, env=env, metrics=metrics)
    if failure is None:
        return
    if failure.problems:
        raise ConfigError(list(failure.problems), source=failure.source)
    typer.echo(f"error: {failure.cause}", err=True)
    raise typer.Exit(failure.exit_code)


def _refuse_another_model(plan: Plan, *, path: Path, model: str, script: list[str] | None) -> None:
    """ConfigError when the plan was tuned for a model other than the one given."""
    from zeroplan.autotune.identity import describe, model_mismatch
    from zeroplan.autotune.models import TrialWorkload

    recorded = plan.provenance.model_identity
    given = TrialWorkload(model=model, script=tuple(script or ()), cwd=Path.cwd())
    why = model_mismatch(recorded, given)
    if why:
        option = "script" if script else "--model"
        raise ConfigError(Problem(option, f"{path} was tuned for the model {describe(recorded)}; {why}",
                                  suggestion="train the model the plan was tuned for, or tune this one "
                                  "(zeroplan autotune CONFIG --model ... / --script ...) and train its best plan"))
