"""Field types: "auto" as a typed value, DeepSpeed's numeric spellings, no silent coercion."""

from __future__ import annotations

import copy
import pickle

import pytest

from zeroplan.schemas import AUTO, Auto, ConfigError, TrainConfig, is_auto, load_config


def test_auto_is_a_singleton_that_survives_copy_and_pickle():
    assert Auto() is AUTO
    assert copy.deepcopy(AUTO) is AUTO
    assert pickle.loads(pickle.dumps(AUTO)) is AUTO


@pytest.mark.parametrize("spelling", ["auto", "AUTO", " Auto "])
def test_auto_is_held_as_the_typed_value_and_dumped_back(spelling):
    cfg = load_config({"train_batch_size": spelling, "zero_optimization": {"stage": spelling}})
    assert cfg.train_batch_size is AUTO and is_auto(cfg.zero_optimization.stage)
    dumped = cfg.model_dump(mode="json")
    assert dumped["train_batch_size"] == "auto"
    assert TrainConfig.model_validate(dumped) == cfg


@pytest.mark.parametrize("value, expected", [(5e8, 500_000_000), ("5e8", 500_000_000), ("1_000", 1000), (7, 7)])
def test_counts_accept_deepspeed_spellings(value, expected):
    cfg = load_config({"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": value}})
    assert cfg.zero_optimization.reduce_bucket_size == expected
    assert type(cfg.zero_optimization.reduce_bucket_size) is int


@pytest.mark.parametrize("value", [True, 2.5, "2.5", "lots", float("inf"), [1], None])
def test_counts_refuse_anything_else(value):
    with pytest.raises(ConfigError) as e:
        load_config({"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": value}})
    assert e.value.problems[0].path == "zero_optimization.reduce_bucket_size"


def test_reals_accept_numeric_strings_and_refuse_auto_where_not_decidable():
    cfg = load_config({"train_batch_size": 8, "optimizer": {"type": "adamw", "params": {"lr": "3e-4"}}})
    assert cfg.optimizer.params.lr == pytest.approx(3e-4) and cfg.optimizer.type == "AdamW"
    with pytest.raises(ConfigError, match="gradient_predivide_factor: 'auto' is not accepted"):
        load_config({"train_batch_size": 8, "gradient_predivide_factor": "auto"})


@pytest.mark.parametrize("value, expected", [(True, True), (0, False), ("false", False), ("TRUE", True)])
def test_flags(value, expected):
    assert load_config({"train_batch_size": 8, "wall_clock_breakdown": value}).wall_clock_breakdown is expected


@pytest.mark.parametrize("value", ["yes", 2, 0.5])
def test_flags_refuse_other_values(value):
    with pytest.raises(ConfigError, match="wall_clock_breakdown: expected true or false"):
        load_config({"train_batch_size": 8, "wall_clock_breakdown": value})


def test_every_problem_is_reported_in_one_run():
    with pytest.raises(ConfigError) as e:
        load_config({
            "train_batch_size": 8,
            "gradient_clipp1ng": 1.0,
            "zero_optimization": {"stage": 9},
            "optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 400, "cuda_aware": False}},
            "fp16": {"enabled": "maybe"},
        })
    paths = sorted(p.path for p in e.value.problems)
    assert paths == ["fp16.enabled", "gradient_clipp1ng", "optimizer.type", "zero_optimization.stage"]


def test_block_rules_are_reported_next_to_errors_elsewhere():
    with pytest.raises(ConfigError) as e:
        load_config({"train_batch_size": 8, "gradient_clipp1ng": 1.0,
                     "zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}})
    paths = sorted(p.path for p in e.value.problems)
    assert paths == ["gradient_clipp1ng", "zero_optimization.offload_param.device"]


def test_auto_stage_allows_stage3_only_options():
    cfg = load_config({"train_batch_size": 8, "zero_optimization": {"stage": "auto", "offload_param": {"device": "cpu"}}})
    assert cfg.zero_optimization.offload_param.device == "cpu"


def test_autotp_size_is_read_as_tp():
    cfg = load_config({"train_batch_size": 8, "tensor_parallel": {"autotp_size": 2}})
    assert cfg.tp == 2 and cfg.parallel.tp is None


def test_precision_summary():
    assert load_config({"train_batch_size": 8}).precision == "fp32"
    assert load_config({"train_batch_size": 8, "bf16": {"enabled": True}}).precision == "bf16"
    assert load_config({"train_batch_size": 8, "fp16": {"enabled": "auto"}}).precision == "auto"
