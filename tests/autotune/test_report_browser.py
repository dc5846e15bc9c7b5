"""report.html opened in headless Chromium with the network off: the scripts ran (every
plotly figure drew its SVG), the count is right, no cell says nan, every failure has its reason."""

from __future__ import annotations

import os
import re

import pytest

from zeroplan.autotune.results import NO_REASON, write_results

from .browser import chromium, dump_dom, read_page
from .report_study import CRASH, build_study

BROWSER = chromium()
if BROWSER is None and not os.environ.get("ZEROPLAN_REQUIRE_BROWSER"):  # .ci/run sets it: CI must have one
    pytest.skip("no Chromium on this machine: install Debian's `chromium` (`make test` does where apt-get "
                "exists) or set CHROMIUM to a Chromium or Chrome binary", allow_module_level=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser")
    write_results(build_study(out, pareto=True), out_dir=out, objective="pareto")
    assert BROWSER is not None, "ZEROPLAN_REQUIRE_BROWSER is set but no Chromium was found"
    return read_page(dump_dom(out / "report.html", binary=BROWSER))


def test_every_plot_was_drawn_by_plotly_js(page):
    assert len(page.plots) == 6  # history, importances, parallel coordinates, Pareto front, predicted vs measured,
    # prediction error per trial
    for div_id, plot in page.plots.items():
        assert "js-plotly-plot" in plot["classes"] and plot["main_svg"] >= 1, div_id


def test_the_page_counts_every_trial_and_says_nan_nowhere(page):
    assert page.by_id["trial-count"] == "7 trials: 4 complete, 1 pruned, 2 failed."
    assert len(page.rows) == 7
    visible = " ".join(page.text)
    assert not re.search(r"\bnan\b", visible, re.IGNORECASE), "a nan on the page"


def test_every_failed_trial_shows_its_reason(page):
    failed = {row[0]: row[-1] for row in page.rows if row[1] == "failed"}
    assert failed == {"1": CRASH, "5": NO_REASON}
    assert all(row[-1] for row in page.rows if row[1] != "complete")
