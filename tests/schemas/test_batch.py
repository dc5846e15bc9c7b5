"""Batch resolution with DeepSpeed's rules, and messages that say given vs derived."""

from __future__ import annotations

import pytest

from zeroplan.schemas import ConfigError, load_config, resolve_batch


@pytest.mark.parametrize("given, dp, expected", [
    ((32, 4, 2), 4, (32, 4, 2)),      # all three, consistent
    ((32, 4, None), 4, (32, 4, 2)),   # accumulation derived
    ((32, None, 2), 4, (32, 4, 2)),   # micro-batch derived
    ((None, 4, 2), 4, (32, 4, 2)),    # global derived
    ((32, None, None), 4, (32, 8, 1)),  # only global: accumulation 1
    ((None, 4, None), 4, (16, 4, 1)),  # only micro: accumulation 1
    ((8, 8, None), 1, (8, 8, 1)),
])
def test_two_of_three_derive_the_third(given, dp, expected):
    plan = resolve_batch(*given, dp=dp)
    assert (plan.global_batch_size, plan.micro_batch_size, plan.gradient_accumulation_steps) == expected
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert set(plan.derived) == {n for n, v in zip(names, given) if v is None}


def test_mismatch_message_says_which_values_were_derived():
    with pytest.raises(ConfigError) as e:
        resolve_batch(8, 3, None, dp=1)
    assert ("train_batch_size 8 (given) != micro-batch 3 (given) x grad accumulation 2 (derived) x dp 1"
            in e.value.problems[0].message)


def test_all_given_but_wrong_for_the_world_size():
    with pytest.raises(ConfigError, match=r"32 \(given\) != micro-batch 4 \(given\) x grad accumulation 2 \(given\) x dp 2"):
        resolve_batch(32, 4, 2, dp=2)


def test_neither_global_nor_micro():
    with pytest.raises(ConfigError, match="neither train_batch_size nor train_micro_batch_size_per_gpu"):
        resolve_batch(None, None, 4, dp=2)


def test_world_size_checks_degrees_and_batch_at_load():
    with pytest.raises(ConfigError, match=r"grad accumulation 2 \(derived\) x dp 1"):
        load_config({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 3}, world_size=1)
    with pytest.raises(ConfigError, match=r"tp\(3\) \* pp\(1\) = 3 does not divide world_size\(4\)"):
        load_config({"train_batch_size": 8, "parallel": {"tp": 3}}, world_size=4)
    with pytest.raises(ConfigError, match=r"dp\(2\) \* tp\(2\) \* pp\(2\) = 8 != world_size\(16\) \(given: 2\); change parallel.dp"):
        load_config({"train_batch_size": 16, "parallel": {"dp": 2, "tp": 2, "pp": 2}}, world_size=16)
    cfg = load_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "parallel": {"tp": 2}}, world_size=8)
    assert cfg.train_batch_size == 16


def test_auto_batch_fields_are_left_to_compile():
    cfg = load_config({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 3}, world_size=7)
    assert cfg.train_micro_batch_size_per_gpu == 3
