"""The tuner's sampler, pruner and objective names: defined once (schemas/autotuning.py), each
constructible, and the same set wherever a user can give one."""

from __future__ import annotations

import optuna
import pytest
from typer.testing import CliRunner

from zeroplan.autotune.space import Dimension
from zeroplan.autotune.study import make_pruner, make_sampler
from zeroplan.schemas import load_config
from zeroplan.schemas.autotuning import OBJECTIVES, PRUNERS, SAMPLERS, directions

DIMS = [Dimension("zero_optimization.stage", choices=(1, 2)), Dimension("gradient_accumulation_steps", low=1, high=4)]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_builds_and_samples(name):
    sampler = make_sampler(name, dims=DIMS, seed=0)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    study = optuna.create_study(sampler=sampler, directions=["maximize", "minimize"] if name == "nsga2" else None)
    trial = study.ask()
    assert trial.suggest_categorical("zero_optimization.stage", [1, 2]) in (1, 2)
    assert 1 <= trial.suggest_int("gradient_accumulation_steps", 1, 4) <= 4


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_builds(name):
    assert isinstance(make_pruner(name), optuna.pruners.BasePruner)


def test_unknown_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match="tpe, random, grid, nsga2"):
        make_sampler("cmaes", dims=DIMS, seed=0)
    with pytest.raises(ValueError, match="median, hyperband, none"):
        make_pruner("patient")


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_is_a_config_metric_with_directions_optuna_takes(name):
    assert load_config({"train_batch_size": 8, "autotuning": {"metric": name}}).autotuning.metric == name
    optuna.create_study(directions=directions(name))


def test_the_config_and_the_command_line_accept_the_same_names():
    for key, names in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        for name in names:
            assert getattr(load_config({"train_batch_size": 8, "autotuning": {key: name}}).autotuning, key) == name
    from zeroplan.cli import app

    help_text = CliRunner().invoke(app, ["autotune", "--help"], env={"COLUMNS": "200"}).output
    assert " | ".join(SAMPLERS) in help_text and " | ".join(OBJECTIVES) in help_text
