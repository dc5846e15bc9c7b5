"""trials.csv, report.md and report.html of a real SQLite study with completed, failed, pruned
and reused trials (report_study.py), as `write_results` writes them at the end of a tune."""

from __future__ import annotations

import html
import re
import sys

import pandas as pd
import pytest

from zeroplan.autotune.report_plots import PLOTS_EXTRA
from zeroplan.autotune.results import NO_REASON, write_results

from .report_study import CRASH, TRIALS, build_study

COUNT = "7 trials: 4 complete, 1 pruned, 2 failed."


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    study = build_study(out)
    write_results(study, out_dir=out, objective="throughput")
    return out


def test_trials_csv_writes_integers_as_integers_and_a_reason_for_every_failure(single):
    text = (single / "trials.csv").read_text()
    assert "100000000," in text and ".0," not in text.replace("0.0", "")  # no 4.0, 100000000.0, ...
    frame = pd.read_csv(single / "trials.csv")
    assert frame["param:zero_optimization.stage"].tolist() == [t[0] for t in TRIALS]
    failed = frame[frame["state"] == "fail"]
    assert failed["reason"].tolist() == [CRASH, NO_REASON]


def test_report_md_counts_every_trial_and_shows_no_nan(single):
    text = (single / "report.md").read_text()
    assert f"\n{COUNT}\n" in text and "Best: trial 2, 193.94 samples/s, ZeRO stage 2" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "stage3_max_live_parameters=100000000 |" in text and "=4.0" not in text


def test_report_html_is_one_offline_page_with_every_plot(single):
    page = (single / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)  # plotly.js inlined, nothing to fetch
    assert page.count("Plotly.newPlot(") == 5 and "Not drawn" not in page
    for title in ("Optimisation history", "Parameter importances for samples/s", "Parallel coordinates",
                  "Predicted vs measured, per trial", "Step-time prediction error, per trial"):
        assert f"<h3>{title}</h3>" in page
    assert f'<p id="trial-count">{COUNT}</p>' in page and "# Autotuning" not in page
    assert "trial &#39;x&#39; &lt; 2" in page  # the reason is escaped, not raw HTML


def test_a_multi_objective_study_gets_its_pareto_front(tmp_path):
    study = build_study(tmp_path, pareto=True)
    write_results(study, out_dir=tmp_path, objective="pareto")
    page = (tmp_path / "report.html").read_text()
    assert "<h3>Pareto front</h3>" in page and page.count("Plotly.newPlot(") == 6


def test_a_plot_the_study_cannot_have_yet_says_why(tmp_path):
    study = build_study(tmp_path, trials=TRIALS[:2])  # one completed, one failed
    write_results(study, out_dir=tmp_path, objective="throughput")
    page = (tmp_path / "report.html").read_text()
    assert "Not drawn: needs at least 2 completed trials, the study has 1." in page
    assert page.count("Plotly.newPlot(") == 4 and "2 trials: 1 complete, 1 failed." in page


def test_without_plotly_the_tables_stay_and_the_page_names_the_extra(single, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "plotly", None)  # what an install without the extra finds
    study = build_study(tmp_path, trials=TRIALS[:2])
    write_results(study, out_dir=tmp_path, objective="throughput")
    page = (tmp_path / "report.html").read_text()
    assert PLOTS_EXTRA in html.unescape(page) and "<script" not in page
    assert "2 trials: 1 complete, 1 failed." in page and CRASH.split(" |")[0] in page
