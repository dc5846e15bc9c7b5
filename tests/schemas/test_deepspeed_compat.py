"""DeepSpeed 0.19 configs as DeepSpeed reads them: both spellings of the ZeRO-3 keys, its range
rules, the optimizer types it builds, and the top-level keys it ignores."""

from __future__ import annotations

import warnings

import pytest

from zeroplan.schemas import ConfigError, ConfigWarning, load_config
from zeroplan.schemas.optim import OPTIMIZER_PARAMS
from zeroplan.schemas.zero import DEEPSPEED_FIELD_NAMES

VALUES = {"prefetch_bucket_size": 1234, "param_persistence_threshold": 55, "model_persistence_threshold": 77,
          "max_live_parameters": 0, "max_reuse_distance": 0, "gather_16bit_weights_on_model_save": True}


def _load(data: dict):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config({"train_batch_size": 8, **data})
    return config, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


@pytest.mark.parametrize("name", sorted(DEEPSPEED_FIELD_NAMES))
def test_deepspeed_field_names_are_the_stage3_keys(name):
    config, _ = _load({"zero_optimization": {"stage": 3, name: VALUES[name]}})
    assert getattr(config.zero_optimization, DEEPSPEED_FIELD_NAMES[name]) == VALUES[name]


def test_both_spellings_with_one_value_are_accepted():
    config, _ = _load({"zero_optimization": {"stage": 3, "max_live_parameters": "1e9",
                                             "stage3_max_live_parameters": 1_000_000_000}})
    assert config.zero_optimization.stage3_max_live_parameters == 1_000_000_000


def test_both_spellings_with_two_values_are_one_problem():
    with pytest.raises(ConfigError) as e:
        _load({"zero_optimization": {"stage": 3, "prefetch_bucket_size": 5, "stage3_prefetch_bucket_size": 6}})
    assert [p.path for p in e.value.problems] == ["zero_optimization.prefetch_bucket_size"]
    assert "other spelling of 'stage3_prefetch_bucket_size'" in str(e.value)


def test_sub_group_size_zero_is_accepted_and_reduce_bucket_size_zero_is_not():
    config, _ = _load({"zero_optimization": {"stage": 3, "sub_group_size": 0}})
    assert config.zero_optimization.sub_group_size == 0
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_bucket_size: must be >= 1 \(given: 0\)"):
        _load({"zero_optimization": {"reduce_bucket_size": 0}})  # DeepSpeed: gt=0


@pytest.mark.parametrize("kind, removed", [("OneBitAdam", True), ("ZeroOneAdam", True), ("RMSprop", False)])
def test_an_unsupported_optimizer_is_one_problem_naming_it(kind, removed):
    params = {"lr": 1e-3, "freeze_step": 100, "cuda_aware": False, "comm_backend_name": "nccl", "alpha": 0.9}
    with pytest.raises(ConfigError) as e:
        _load({"optimizer": {"type": kind, "params": params}})
    assert [p.path for p in e.value.problems] == ["optimizer.type"]
    text = str(e.value)
    assert f"'{kind}'" in text and "Adam, AdamW, SGD, Lamb, Lion, Adagrad" in text
    assert ("removed its 1-bit optimizers" in text) is removed


@pytest.mark.parametrize("kind", sorted(OPTIMIZER_PARAMS))
def test_each_optimizer_takes_its_parameters_and_refuses_others(kind):
    values = {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01, "momentum": 0.9,
              "dampening": 0.0, "nesterov": False, "adam_w_mode": True, "torch_adam": False, "bias_correction": False,
              "max_coeff": 5.0, "min_coeff": 0.1, "eps_inside_sqrt": True}
    own = {k: values[k] for k in OPTIMIZER_PARAMS[kind]}
    config, _ = _load({"optimizer": {"type": kind.lower(), "params": own}})
    assert config.optimizer.type == kind
    foreign = sorted(set(values) - set(own))
    with pytest.raises(ConfigError) as e:
        _load({"optimizer": {"type": kind, "params": {**own, foreign[0]: values[foreign[0]]}}})
    assert [p.path for p in e.value.problems] == [f"optimizer.params.{foreign[0]}"]


def test_max_grad_norm_is_refused_as_deepspeed_refuses_it():
    with pytest.raises(ConfigError, match="params.max_grad_norm: DeepSpeed refuses it .*gradient_clipping"):
        _load({"optimizer": {"type": "Lamb", "params": {"max_grad_norm": 1.0}}})


def test_keys_deepspeed_ignores_are_dropped_with_a_notice():
    config, notices = _load({"_comment": "see the docs", "comms_config": {"verbose": False},
                             "monitor_config": {"enabled": True, "csv_monitor": {"enabled": False}}})
    assert config.csv_monitor.enabled is False
    assert any("'_comment' is read as a comment" in n for n in notices)
    assert any("'monitor_config' is not a DeepSpeed key" in n for n in notices)
    assert any("'comms_config' is not a DeepSpeed key" in n for n in notices)


def test_accelerate_auto_for_gathering_16bit_weights():
    config, _ = _load({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": "auto"}})
    assert str(config.zero_optimization.stage3_gather_16bit_weights_on_model_save) == "auto"
