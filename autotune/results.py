"""What a study leaves behind: best_plan.json, trials.csv, report.md and report.html.

Everything is derived from the stored study (and the plans saved in each trial's folder,
`trials/<study>/trial-NNNN`: one folder per study, as trial numbers restart in each study that
shares the directory), so `zeroplan report DIR` re-renders it at any time, also while another
worker still runs. The renderings of the report are in report.py; this module owns the data
they show. A trial enqueued but not yet run (WAITING: the next run of the study takes it) is
no trial of the results: it has no parameters and no outcome yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import re

import optuna
import pandas as pd

from zeroplan.schemas import Plan
from zeroplan.schemas.atomic import atomic_write_text

from .report import render_html, render_markdown
from .identity import identity_digest
from .learned_cost import relative_error
from .study import IDENTITY_ATTR, WORKER_ATTR

TRIAL_ATTRS = ("reason", "duplicate_of", "predicted_peak_bytes", "measured_peak_bytes",
               "predicted_step_time_s", "learned_step_time_s", "learned_from_trials", "measured_step_time_s",
               "measured_samples_per_s", "wall_s")
"""The user attributes the tuner records on a trial (autotune/tune.py) that trials.csv shows:
the cost model's predicted step, the learned model's (fitted to the `learned_from_trials`
trials before this one, learned_cost.py) and the measured one."""

NO_REASON = ("no reason recorded: its tuner stopped before recording one (killed, or an error outside the "
             "trial), or Optuna failed it after its worker stopped sending heartbeats")


def trial_reason(trial: optuna.trial.FrozenTrial) -> str:
    """Why a trial ended as it did: the tuner's recorded reason, else what its state tells.

    A failed trial always has one, so no row of the report leaves a failure unexplained."""
    recorded = trial.user_attrs.get("reason")
    if recorded:
        return str(recorded)
    state = trial.state
    if state == optuna.trial.TrialState.FAIL:
        return NO_REASON
    if state == optuna.trial.TrialState.PRUNED:
        return "pruned by the pruner (no reason recorded)"
    if state == optuna.trial.TrialState.RUNNING:
        worker = trial.user_attrs.get(WORKER_ATTR) or {}
        return f"running on {worker.get('host', '?')} (pid {worker.get('pid', '?')})" if worker else "running"
    if state == optuna.trial.TrialState.WAITING:
        return "queued"
    return ""


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, parameters, values, reasons and measurements.

    A column whose values are all integers is pandas' nullable Int64, so a parameter or a byte
    count that some trials lack stays an integer (`4`, never `4.0`) in trials.csv and the report;
    a missing value is <NA>, written as an empty field."""
    rows = []
    for t in study.trials:
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        row: dict[str, Any] = {"number": t.number, "state": t.state.name.lower()}
        row.update({f"param:{k}": v for k, v in t.params.items()})
        if t.values is not None:
            row.update({f"value_{i}": v for i, v in enumerate(t.values)})
        row.update({k: t.user_attrs.get(k) for k in TRIAL_ATTRS})
        row["prediction_error"] = prediction_error(t.user_attrs)
        row["reason"] = trial_reason(t)
        rows.append(row)
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key, values in columns.items():
            values.append(row.get(key))
    return pd.DataFrame({key: pd.array(values, dtype="Int64") if _integral(values) else values
                         for key, values in columns.items()}, index=pd.RangeIndex(len(rows)))


def prediction_error(attrs: dict[str, Any]) -> float | None:
    """Relative error of the step time the tuner predicted for a trial before running it (the
    learned model's when it learns, else the cost model's) against the measured one."""
    predicted = attrs.get("learned_step_time_s", attrs.get("predicted_step_time_s"))
    measured = attrs.get("measured_step_time_s")
    if predicted is None or not measured:
        return None
    return relative_error(predicted_s=predicted, measured_s=measured)


def _integral(values: list) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, int) and not isinstance(v, bool) for v in present)


def best_trial(study: optuna.Study, *, objective: str) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    if objective == "pareto":  # among the Pareto front, the fastest
        return max(study.best_trials, key=lambda t: t.values[0])
    return study.best_trial


def trial_dir(out_dir: Path, study_name: str, number: int) -> Path:
    """Where trial `number` of study `study_name` runs and keeps its plan, log and metrics."""
    return out_dir / "trials" / re.sub(r"[^\w.-]+", "_", study_name) / f"trial-{number:04d}"


def _plan_path(out_dir: Path, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Path:
    number = trial.user_attrs.get("duplicate_of", trial.number)
    path = trial_dir(out_dir, study.study_name, number) / "plan.json"
    if IDENTITY_ATTR not in study.user_attrs and not path.is_file():  # a study from before identities
        return out_dir / "trials" / f"trial-{number:04d}" / "plan.json"
    return path


def best_plan(study: optuna.Study, *, out_dir: Path, objective: str) -> Plan | None:
    """The best trial's plan with its provenance: study, its identity and model, trial,
    measured throughput."""
    trial = best_trial(study, objective=objective)
    if trial is None:
        return None
    plan = Plan.load(_plan_path(out_dir, study, trial))
    identity = study.user_attrs.get(IDENTITY_ATTR) or {}
    provenance = plan.provenance.model_copy(update={
        "study_name": study.study_name, "trial_number": trial.number,
        "study_identity": identity_digest(identity) if identity else "",
        "model_identity": identity.get("model", {}),
        "measured_samples_per_s": trial.user_attrs.get("measured_samples_per_s")})
    return plan.model_copy(update={"provenance": provenance})


def write_results(study: optuna.Study, *, out_dir: Path, objective: str) -> Plan | None:
    """Write every output file; returns the best plan (None when no trial completed)."""
    frame = trials_frame(study)
    atomic_write_text(out_dir / "trials.csv", frame.to_csv(index=False))
    plan = best_plan(study, out_dir=out_dir, objective=objective)
    if plan is not None:
        plan.save(out_dir / "best_plan.json")
    atomic_write_text(out_dir / "report.md", render_markdown(study=study, frame=frame, plan=plan))
    atomic_write_text(out_dir / "report.html", render_html(study=study, frame=frame, plan=plan, objective=objective))
    return plan
