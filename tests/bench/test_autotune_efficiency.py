"""The efficiency benchmark's replay: the tuner itself run against a grid of known answers.

The grid here is made, not measured: every point's step is the cost model's prediction with
its data-parallel traffic 10x dearer, so the cost model alone ranks wrongly and the answers
are known without running anything."""

from __future__ import annotations

import pytest

from bench.autotune_efficiency import GRID_POINTS, replay, space_config
from zeroplan.autotune.tune import Tuner, TuneSettings
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS

TINY = MODEL_PRESETS["tiny"]
CLUSTER = CLUSTER_PRESETS["cpu"].with_shape(nproc_per_node=4)


@pytest.fixture(scope="module")
def record() -> dict:
    data = space_config(global_batch=8)
    tuner = Tuner(data=data, model=TINY, cluster=CLUSTER, settings=TuneSettings(model_name="tiny", nproc_per_node=4))
    points = []
    for ranked in tuner.ranked():
        terms = ranked.terms
        step = sum(terms.values()) + 9 * terms["dp_comm"]
        points.append({"params": ranked.params, "state": "complete", "wall_s": 10.0, "step_time_s": step,
                       "samples_per_s": 8 / step, "peak_bytes": 1})
    assert len(points) == GRID_POINTS
    best = max(points, key=lambda p: p["samples_per_s"])
    assert best["params"] != tuner.ranked()[0].params  # the cost model's first pick is not the best
    return {"model": "gpt", "workload": "tiny", "nproc": 4, "config": data, "points": points}


def test_the_replay_counts_trials_until_the_best(record):
    for learn in (False, True):
        got = replay(record=record, model=TINY, cluster=CLUSTER, seed=0, warm_start=3, learn=learn)
        assert 1 <= got.trials <= 10 * GRID_POINTS and 10.0 <= got.wall_s <= 10.0 * got.trials  # reuses cost none
        assert all(e >= 0 for e in got.errors)


def test_learning_cuts_the_error_of_what_it_predicts(record):
    plain = replay(record=record, model=TINY, cluster=CLUSTER, seed=0, warm_start=3, learn=False)
    learned = replay(record=record, model=TINY, cluster=CLUSTER, seed=0, warm_start=3, learn=True)
    assert len(learned.errors) >= 2
    assert learned.errors[-1] < learned.errors[0] or learned.errors[-1] < 0.05
    assert learned.trials <= plain.trials + 3


def test_a_grid_stopped_early_replays_over_the_points_it_measured(record, tmp_path):
    half = {**record, "points": record["points"][::2]}
    got = replay(record=half, model=TINY, cluster=CLUSTER, seed=0, warm_start=3, learn=True, report_dir=tmp_path)
    assert got.trials >= 1
    assert (tmp_path / "report.html").is_file() and (tmp_path / "trials.csv").is_file()
