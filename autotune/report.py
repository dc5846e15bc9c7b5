"""The report of a study for a person: report.md, and report.html with the plots.

Both show the same summary and the same trial table (one definition of each row's cells).
report.html is one self-contained file: plotly.js is inlined once and every figure's data is
in the page, so it opens offline and can be mailed or archived beside trials.csv. Without
plotly (the `zeroplan[report]` extra) it keeps the summary and the table and says what the
plots need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import optuna
import pandas as pd

from zeroplan.schemas import Plan
from zeroplan.schemas.cluster import GiB

from .report_plots import figures, plotly_js, plots_missing

HEAD = ("trial", "state", "parameters", "samples/s", "predicted GiB/rank", "measured GiB/rank",
        "predicted step s", "measured step s", "prediction error", "reason")
STATE_ORDER = ("complete", "pruned", "fail", "running", "waiting")
"""Optuna's trial states as trials.csv spells them, in the order the summary counts them."""
_STATE_WORDS = {"fail": "failed"}

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          undefined=jinja2.StrictUndefined, autoescape=True, trim_blocks=True, lstrip_blocks=True)


def _present(value: Any) -> bool:
    return value is not None and not (pd.api.types.is_scalar(value) and pd.isna(value))


def _number(value: Any, *, scale: float = 1.0, digits: int = 2) -> str:
    return f"{value / scale:.{digits}f}" if _present(value) else ""


def _predicted_step(row: dict) -> Any:
    """The step time predicted before the trial ran: the learned model's when it learns."""
    learned = row.get("learned_step_time_s")
    return learned if _present(learned) else row.get("predicted_step_time_s")


def _percent(value: Any) -> str:
    return f"{value:+.0%}" if _present(value) else ""


def trial_count(frame: pd.DataFrame) -> str:
    """"7 trials: 4 complete, 1 pruned, 2 failed"; every trial in the study is counted."""
    if frame.empty:
        return "no trials yet"
    counts = frame["state"].value_counts()
    states = [s for s in STATE_ORDER if s in counts] + sorted(set(counts.index) - set(STATE_ORDER))
    total = f"{len(frame)} trial{'s' if len(frame) != 1 else ''}"
    return total + ": " + ", ".join(f"{counts[s]} {_STATE_WORDS.get(s, s)}" for s in states)


def table_rows(frame: pd.DataFrame) -> list[list[str]]:
    """The cells of each trial under HEAD; integers print as integers, a missing value as ""."""
    params = [c for c in frame.columns if c.startswith("param:")]
    rows = []
    for row in frame.to_dict("records"):
        given = "; ".join(f"{c[len('param:'):]}={row[c]}" for c in params if _present(row[c]))
        rows.append([str(row["number"]), _STATE_WORDS.get(row["state"], row["state"]), given,
                     _number(row.get("measured_samples_per_s")),
                     _number(row.get("predicted_peak_bytes"), scale=GiB), _number(row.get("measured_peak_bytes"), scale=GiB),
                     _number(_predicted_step(row), digits=4),
                     _number(row.get("measured_step_time_s"), digits=4),
                     _percent(row.get("prediction_error")),
                     str(row["reason"]) if _present(row.get("reason")) else ""])
    return rows


def best_line(plan: Plan | None) -> str:
    if plan is None:
        return "No trial completed; the reasons are below."
    p = plan.provenance
    speed = f", {p.measured_samples_per_s:.2f} samples/s" if p.measured_samples_per_s is not None else ""
    return (f"Best: trial {p.trial_number}{speed}, ZeRO stage {plan.zero.stage}, micro-batch "
            f"{plan.batch.micro_batch_size} x accumulation {plan.batch.gradient_accumulation_steps}, offload "
            f"optimizer {plan.offload.optimizer.device}, dp {plan.parallel.dp} / tp {plan.parallel.tp} / "
            f"pp {plan.parallel.pp}.")


def render_markdown(*, study: optuna.Study, frame: pd.DataFrame, plan: Plan | None) -> str:
    lines = [f"# Autotuning report: {study.study_name}", "", f"{trial_count(frame)}.", "", best_line(plan), "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for cells in table_rows(frame):
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_html(*, study: optuna.Study, frame: pd.DataFrame, plan: Plan | None, objective: str) -> str:
    missing = plots_missing()
    drawn = [] if missing else figures(study=study, frame=frame, objective=objective)
    return _ENV.get_template("report.html.j2").render(
        title=f"Autotuning report: {study.study_name}", count=trial_count(frame), best=best_line(plan),
        plots_missing=missing, figures=drawn, plotly_js="" if missing else plotly_js(),
        head=HEAD, rows=table_rows(frame))
