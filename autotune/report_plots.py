"""The plots of report.html: Optuna's own visualisations of the study, and how far the
compiler's predictions (memory per rank, step time) were from what each trial measured.

plotly is the optional extra `zeroplan[report]`; `plots_missing()` says so when it is absent
and report.py then renders the page without plots. A figure that cannot be drawn for this
study (too few completed trials, one parameter) becomes a note saying why, never an error:
the report is written at the end of every tune and must not lose the results.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import optuna
import pandas as pd

from zeroplan.schemas.autotuning import OBJECTIVES
from zeroplan.schemas.cluster import GiB

PLOTS_EXTRA = "pip install 'zeroplan[report]'"
_HEIGHT = 460


@dataclass(frozen=True)
class Figure:
    title: str
    html: str = ""
    """The figure's <div> and the script that draws it (plotly.js itself is inlined once)."""
    note: str = ""
    """Why it was not drawn, when `html` is empty."""


def plots_missing() -> str:
    """What the plots need when plotly is not installed; "" when it is."""
    if importlib.util.find_spec("plotly") is None:
        return f"The plots need plotly, which is not installed: {PLOTS_EXTRA}, then run `zeroplan report DIR`."
    return ""


def plotly_js() -> str:
    """plotly.js itself, to inline once per page (no network needed to view the report)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def figures(*, study: optuna.Study, frame: pd.DataFrame, objective: str) -> list[Figure]:
    """Every figure of the report, drawn or with the reason it is not."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = [measure for _, measure in OBJECTIVES.get(objective, ())]
    if len(names) != len(study.directions):
        names = [f"objective {i}" for i in range(len(study.directions))]
    first = {"target": (lambda t: t.values[0]) if len(names) > 1 else None, "target_name": names[0]}
    vis = optuna.visualization
    varying = _varying_params(complete)
    out = [
        _draw("Optimisation history", lambda: vis.plot_optimization_history(study, **first),
              why_not="" if complete else "no completed trial yet"),
        _draw(f"Parameter importances for {names[0]}", lambda: _importances(study, params=varying, name=names[0]),
              why_not=_importance_why_not(complete, varying)),
        _draw("Parallel coordinates", lambda: vis.plot_parallel_coordinate(study, params=varying or None, **first),
              why_not="" if complete else "no completed trial yet"),
    ]
    if len(names) > 1:
        out.append(_draw("Pareto front", lambda: vis.plot_pareto_front(study, target_names=names),
                         why_not="" if complete else "no completed trial yet"))
    measured = _measured(frame)
    out.append(_draw("Predicted vs measured, per trial", lambda: _predicted_vs_measured(measured),
                     why_not="" if len(measured) else "no trial has both a prediction and a measurement yet"))
    out.append(_draw("Step-time prediction error, per trial", lambda: _prediction_errors(measured),
                     why_not="" if len(measured) else "no trial has both a prediction and a measurement yet"))
    return out


def _draw(title: str, make: Callable[[], object], *, why_not: str) -> Figure:
    if why_not:
        return Figure(title, note=f"Not drawn: {why_not}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fig = make()
        fig.update_layout(height=_HEIGHT, margin={"t": 40})
        html = fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False},
                           default_height=f"{_HEIGHT}px")
    except Exception as e:  # a plot that fails for this study must not cost the results (module docstring)
        return Figure(title, note=f"Not drawn: {type(e).__name__}: {e}")
    return Figure(title, html=html)


def _importances(study: optuna.Study, *, params: list[str], name: str):
    """Optuna's importances for the first objective. Optuna's default evaluator (PED-ANOVA)
    ranks parameters by how they reach *low* values of a given target, so a maximised first
    objective of a multi-objective study is given negated (a single objective needs no target:
    the evaluator reads the study's direction)."""
    if len(study.directions) == 1:
        return optuna.visualization.plot_param_importances(study, params=params, target_name=name)
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low")
        return optuna.visualization.plot_param_importances(study, params=params, target=lambda t: sign * t.values[0],
                                                           target_name=name)


def _varying_params(complete: list[optuna.trial.FrozenTrial]) -> list[str]:
    """Parameters with more than one value among the completed trials that all of them have."""
    if not complete:
        return []
    shared = set.intersection(*(set(t.params) for t in complete))
    return sorted(p for p in shared if len({repr(t.params[p]) for t in complete}) > 1)


def _importance_why_not(complete: list[optuna.trial.FrozenTrial], varying: list[str]) -> str:
    if len(complete) < 2:
        return f"needs at least 2 completed trials, the study has {len(complete)}"
    if len(varying) < 2:
        return (f"needs at least 2 parameters that vary among the completed trials, "
                f"{'only ' + varying[0] if varying else 'none'} does")
    return ""


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Trials that ran (not reused) with a prediction and a measurement of memory and step time."""
    cols = ["predicted_peak_bytes", "measured_peak_bytes", "predicted_step_time_s", "measured_step_time_s"]
    if frame.empty or any(c not in frame for c in cols):
        return frame.iloc[0:0]
    ran = frame[frame["duplicate_of"].isna()] if "duplicate_of" in frame else frame
    return ran.dropna(subset=cols)


def _predicted_vs_measured(measured: pd.DataFrame):
    """Two panels, memory per rank (GiB) and step time (s): one point per trial, and the line
    where the measurement equals the prediction."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("peak memory per rank (GiB)", "step time (s)"))
    labels = [f"trial {n}" for n in measured["number"]]
    panels = (("predicted_peak_bytes", "measured_peak_bytes", GiB), ("predicted_step_time_s", "measured_step_time_s", 1))
    for col, (predicted, got, scale) in enumerate(panels, start=1):
        x = (measured[predicted].astype(float) / scale).tolist()
        y = (measured[got].astype(float) / scale).tolist()
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers+text", text=labels, textposition="top center",
                                 name="trial", showlegend=col == 1, marker={"size": 9, "color": "#4a7bd0"}), row=1, col=col)
        top = max(x + y) * 1.1
        fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="measured = predicted",
                                 showlegend=col == 1, line={"dash": "dot", "color": "#888"}), row=1, col=col)
        fig.update_xaxes(title_text="predicted", rangemode="tozero", row=1, col=col)
        fig.update_yaxes(title_text="measured", rangemode="tozero", row=1, col=col)
    return fig


def _prediction_errors(measured: pd.DataFrame):
    """The relative error of the predicted step time by trial, in the order the trials ran:
    the cost model's, and the learned model's (fitted to the trials before each) when the
    tuner learns, which should fall toward zero as trials accumulate."""
    import plotly.graph_objects as go

    fig = go.Figure()
    got = measured["measured_step_time_s"].astype(float)
    series = [("cost model", "predicted_step_time_s", "#888")]
    if "learned_step_time_s" in measured and measured["learned_step_time_s"].notna().any():
        series.append(("learned from the trials before", "learned_step_time_s", "#4a7bd0"))
    for name, column, colour in series:
        rows = measured[measured[column].notna()]
        error = (rows[column].astype(float) - got[rows.index]) / got[rows.index]
        fig.add_trace(go.Scatter(x=rows["number"].tolist(), y=error.tolist(), mode="lines+markers", name=name,
                                 line={"color": colour}))
    fig.add_hline(y=0, line={"dash": "dot", "color": "#888"})
    fig.update_xaxes(title_text="trial")
    fig.update_yaxes(title_text="(predicted - measured) / measured", tickformat="+.0%")
    return fig
