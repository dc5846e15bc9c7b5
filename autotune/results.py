"""What a study leaves behind: best_plan.json, trials.csv, report.md and report.html.

Everything is derived from the stored study (and the plans saved in each trial's folder),
so `zeroplan report DIR` re-renders it at any time, also while another worker still runs.
"""

from __future__ import annotations

import html
from pathlib import Path

import optuna
import pandas as pd

from zeroplan.schemas import Plan
from zeroplan.schemas.atomic import atomic_write_text

GIB = 1024**3
_ATTRS = ("reason", "duplicate_of", "predicted_peak_bytes", "measured_peak_bytes",
          "predicted_step_time_s", "measured_step_time_s", "measured_samples_per_s", "wall_s")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, parameters, values, reasons and measurements."""
    rows = []
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name.lower()}
        row.update({f"param:{k}": v for k, v in t.params.items()})
        if t.values is not None:
            row.update({f"value_{i}": v for i, v in enumerate(t.values)})
        row.update({k: t.user_attrs.get(k) for k in _ATTRS})
        rows.append(row)
    return pd.DataFrame(rows)


def best_trial(study: optuna.Study, *, objective: str) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    if objective == "pareto":  # among the Pareto front, the fastest
        return max(study.best_trials, key=lambda t: t.values[0])
    return study.best_trial


def _plan_path(out_dir: Path, trial: optuna.trial.FrozenTrial) -> Path:
    number = trial.user_attrs.get("duplicate_of", trial.number)
    return out_dir / "trials" / f"trial-{number:04d}" / "plan.json"


def best_plan(study: optuna.Study, *, out_dir: Path, objective: str) -> Plan | None:
    """The best trial's plan with its provenance: study, trial, measured throughput."""
    trial = best_trial(study, objective=objective)
    if trial is None:
        return None
    plan = Plan.load(_plan_path(out_dir, trial))
    provenance = plan.provenance.model_copy(update={
        "study_name": study.study_name, "trial_number": trial.number,
        "measured_samples_per_s": trial.user_attrs.get("measured_samples_per_s")})
    return plan.model_copy(update={"provenance": provenance})


def write_results(study: optuna.Study, *, out_dir: Path, objective: str) -> Plan | None:
    """Write every output file; returns the best plan (None when no trial completed)."""
    frame = trials_frame(study)
    atomic_write_text(out_dir / "trials.csv", frame.to_csv(index=False))
    plan = best_plan(study, out_dir=out_dir, objective=objective)
    if plan is not None:
        plan.save(out_dir / "best_plan.json")
    atomic_write_text(out_dir / "report.md", render_markdown(study, frame, plan))
    atomic_write_text(out_dir / "report.html", render_html(study, frame, plan))
    return plan


def _counts(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "no trials"
    counts = frame["state"].value_counts()
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def _gib(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value / GIB:.2f}"


def _row_cells(row: pd.Series) -> list[str]:
    params = "; ".join(f"{k[6:]}={row[k]}" for k in row.index if k.startswith("param:") and not pd.isna(row[k]))
    speed = row.get("measured_samples_per_s")
    return [str(row["number"]), row["state"], params, "" if speed is None or pd.isna(speed) else f"{speed:.2f}",
            _gib(row.get("predicted_peak_bytes")), _gib(row.get("measured_peak_bytes")),
            str(row.get("reason") or "")]


_HEAD = ["trial", "state", "parameters", "samples/s", "predicted GiB/rank", "measured GiB/rank", "reason"]


def render_markdown(study: optuna.Study, frame: pd.DataFrame, plan: Plan | None) -> str:
    lines = [f"# Autotuning report: {study.study_name}", "", f"Trials: {_counts(frame)}.", ""]
    if plan is not None:
        p = plan.provenance
        lines += [f"Best: trial {p.trial_number}, {p.measured_samples_per_s:.2f} samples/s, ZeRO stage "
                  f"{plan.zero.stage}, micro-batch {plan.batch.micro_batch_size} x accumulation "
                  f"{plan.batch.gradient_accumulation_steps}, offload optimizer {plan.offload.optimizer.device}, "
                  f"dp {plan.parallel.dp} / tp {plan.parallel.tp} / pp {plan.parallel.pp}.", ""]
    else:
        lines += ["No trial completed; the reasons are below.", ""]
    lines += ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    for _, row in frame.iterrows():
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in _row_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bars(frame: pd.DataFrame) -> str:
    """An inline SVG bar chart of measured throughput per trial (no plotting dependency)."""
    if frame.empty or "measured_samples_per_s" not in frame:
        return ""
    data = [(int(r["number"]), float(r["measured_samples_per_s"])) for _, r in frame.iterrows()
            if r["measured_samples_per_s"] is not None and not pd.isna(r["measured_samples_per_s"])]
    if not data:
        return ""
    top = max(v for _, v in data) or 1.0
    width, bar = 640, 22
    rows = [f'<svg width="{width}" height="{bar * len(data) + 10}" xmlns="http://www.w3.org/2000/svg">']
    for i, (number, value) in enumerate(data):
        w = int((width - 160) * value / top)
        rows.append(f'<text x="0" y="{i * bar + 15}" font-size="12">trial {number}</text>'
                    f'<rect x="70" y="{i * bar + 4}" width="{w}" height="{bar - 6}" fill="#4a7bd0"/>'
                    f'<text x="{75 + w}" y="{i * bar + 15}" font-size="12">{value:.2f}</text>')
    rows.append("</svg>")
    return "\n".join(rows)


def render_html(study: optuna.Study, frame: pd.DataFrame, plan: Plan | None) -> str:
    summary = html.escape(render_markdown(study, frame.iloc[0:0], plan).split("| trial")[0])
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row_cells(row)) + "</tr>"
                    for _, row in frame.iterrows())
    head = "".join(f"<th>{h}</th>" for h in _HEAD)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.study_name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<pre>{summary}</pre><h2>Measured throughput (samples/s)</h2>{_bars(frame)}"
            f"<h2>Trials</h2><table><tr>{head}</tr>{cells}</table></body></html>\n")
