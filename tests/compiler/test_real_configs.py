"""The real configs of tests/schemas/corpus (real_*) that DeepSpeed accepts compile to a plan.

What Hugging Face's Trainer fills from its arguments (the learning rate, the warm-up and run
length) is given as `--set` would, the micro-batch is left to the cost model
(`resolve_auto`), and every other "auto" is decided by compile's rules and recorded."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from zeroplan.compiler import compile
from zeroplan.compiler.autoresolve import TRAINER_ONLY, auto_fields
from zeroplan.schemas import ClusterSpec, ConfigError, ConfigWarning, ModelSpec, load_config

CORPUS = Path(__file__).parents[1] / "schemas" / "corpus"
EXPECTED = yaml.safe_load((CORPUS / "EXPECTED.yaml").read_text())
ACCEPTED = sorted(n for n, e in EXPECTED.items() if n.startswith("real_") and e["outcome"] != "error")
TRAINER = {"optimizer.params.lr": 2e-5, "scheduler.params.warmup_num_steps": 10,
           "scheduler.params.total_num_steps": 1000}
"""What a Trainer run would fill in for the keys only it knows."""
RANKS = {"real_dsexamples_cifar_ds_config.json": 4, "real_megatron_deepspeed_ds_config.json": 1}
"""Configs whose batch triple fixes the dp degree (train_batch_size 4; 16 = 16 x 1 x dp); others run on 8."""


def _compile(config, name: str, **kwargs):
    return compile(config, ModelSpec.load("1b"), ClusterSpec.load("h100-80"), nproc_per_node=RANKS.get(name, 8),
                   **kwargs)


def _load(name: str, *, fill: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        config = load_config(CORPUS / name)
        autos = auto_fields(config)
        sets = [f"{k}={v}" for k, v in TRAINER.items() if k in autos] if fill else []
        return load_config(CORPUS / name, overrides=sets), autos


@pytest.mark.parametrize("name", ACCEPTED)
def test_a_real_config_compiles(name):
    config, autos = _load(name, fill=True)
    plan = _compile(config, name, resolve_auto=True)
    decided = set(plan.provenance.resolved_auto)
    assert decided == set(autos) - set(TRAINER), "every 'auto' is decided and recorded"
    assert plan.zero.sub_group_size >= 1 and plan.batch.micro_batch_size >= 1


@pytest.mark.parametrize("name", ACCEPTED)
def test_without_resolve_auto_only_the_micro_batch_and_trainer_keys_are_asked_for(name):
    config, autos = _load(name, fill=False)
    asked = {k for k in autos if k in TRAINER_ONLY}
    if "train_micro_batch_size_per_gpu" in autos:
        asked.add("train_micro_batch_size_per_gpu")
    if "scheduler.params.warmup_max_lr" in autos and "optimizer.params.lr" in autos:
        asked.add("scheduler.params.warmup_max_lr")
    try:
        _compile(config, name)
    except ConfigError as e:
        assert sorted(p.path for p in e.problems) == sorted(asked)
    else:
        assert not asked
