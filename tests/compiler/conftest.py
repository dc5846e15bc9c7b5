"""Shared builders for the compiler tests: real configs, presets and compiles, no mocks."""

from __future__ import annotations

import warnings

import pytest

from zeroplan.compiler import compile
from zeroplan.schemas import ClusterSpec, ConfigWarning, ModelSpec, validate_config


def _config_of(data: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return validate_config(dict(data))


def _compile_dict(data: dict, model: str = "tiny", cluster: str = "cpu", **kwargs):
    return compile(_config_of(data), ModelSpec.load(model), ClusterSpec.load(cluster), **kwargs)


@pytest.fixture
def tiny() -> ModelSpec:
    return ModelSpec.load("tiny")


@pytest.fixture
def compile_dict():
    """compile_dict(config_data, model="tiny", cluster="cpu", **compile_kwargs) -> Plan."""
    return _compile_dict


@pytest.fixture
def config_of():
    """config_of(config_data) -> TrainConfig, notices silenced."""
    return _config_of
