"""The knob table (schemas/knobs.py) against the schema it names and the two searches it feeds."""

from __future__ import annotations

import itertools

import pytest

from zeroplan.autotune.space import search_space
from zeroplan.compiler.autoresolve import auto_fields, set_path
from zeroplan.compiler.search import _knob_options
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ConfigError, load_config
from zeroplan.schemas.knobs import KNOBS, SEARCHED, TUNABLE, KnobContext, candidates, conflict

TINY = MODEL_PRESETS["tiny"]


def _config_with(key: str, value) -> dict:
    data = {"train_batch_size": 16}
    set_path(data, key, value)
    return data


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.key)
def test_every_knob_is_a_config_key_that_takes_auto(knob):
    data = _config_with(knob.key, "auto")
    if knob.key == "train_batch_size":
        data = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2}
    assert knob.key in auto_fields(load_config(data))


@pytest.mark.parametrize("knob", [k for k in KNOBS if not k.degree and k.compile != "derived"], ids=lambda k: k.key)
def test_every_candidate_is_a_value_the_schema_accepts(knob):
    context = KnobContext(nvme_blocks=frozenset({"offload_optimizer", "offload_param"}), global_batch=16, dp=2)
    values = candidates(knob.key, context=context)
    assert values
    for value in values:
        data = _config_with(knob.key, value)
        owner = knob.only_if or ("zero_optimization.stage", 1 if knob.kind == "device" else 0)
        set_path(data, owner[0], owner[1])
        if knob.kind == "device":
            set_path(data, knob.key.rsplit(".", 1)[0] + ".nvme_path", "/tmp/nvme")
        load_config(data)


def test_the_conflict_rule_is_the_schemas_rule():
    for stage, opt, par in itertools.product((0, 1, 2, 3), ("none", "cpu", "nvme"), ("none", "cpu", "nvme")):
        data = {"train_batch_size": 16, "zero_optimization": {
            "stage": stage, "offload_optimizer": {"device": opt, "nvme_path": "/tmp/nvme"},
            "offload_param": {"device": par, "nvme_path": "/tmp/nvme"}}}
        reason = conflict({"zero_optimization.stage": stage, "zero_optimization.offload_optimizer.device": opt,
                           "zero_optimization.offload_param.device": par})
        try:
            load_config(data)
            accepted = True
        except ConfigError:
            accepted = False
        assert accepted == (reason is None), (stage, opt, par, reason)


def test_micro_batch_candidates_divide_the_global_batch_per_data_parallel_rank():
    assert candidates("train_micro_batch_size_per_gpu", context=KnobContext()) == (1, 2, 4, 8, 16, 32, 64)
    assert candidates("train_micro_batch_size_per_gpu", context=KnobContext(global_batch=24, dp=2)) == (1, 2, 4, 8)
    assert candidates("train_micro_batch_size_per_gpu", context=KnobContext(global_batch=3, dp=4)) == (1,)
    with pytest.raises(ValueError, match="enumerated together"):
        candidates("parallel.tp", context=KnobContext())


def test_compile_search_and_tuner_space_take_the_same_candidates():
    """Every knob both searches choose gets the same values from each."""
    data = {"train_batch_size": 16, "zero_optimization": {
        "stage": "auto", "overlap_comm": "auto", "offload_optimizer": {"device": "auto", "nvme_path": "/tmp/n"},
        "offload_param": {"device": "auto"}}, "activation_checkpointing": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto"}
    config = load_config(data)
    tuner = {d.name: d.choices for d in search_space(config, world_size=1, model=TINY)}
    autos = auto_fields(config)
    compiled = {}
    for options in _knob_options(config.model_dump(mode="json", by_alias=True, exclude_unset=True), autos, TINY,
                                 CLUSTER_PRESETS["cpu"]):
        for key in options[0]:
            if options[0][key] is not None:
                compiled[key] = tuple(o[key] for o in options)
    both = set(tuner) & set(compiled)
    assert both == {k for k in autos if k in TUNABLE and k in SEARCHED}
    assert {k: tuner[k] for k in both} == {k: compiled[k] for k in both}
