"""Property: arbitrary JSON only ever yields a TrainConfig or a ConfigError."""

from __future__ import annotations

import json
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeroplan.schemas import ConfigError, TrainConfig, load_config
from zeroplan.schemas.loader import validate_config

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["auto", "5e8", "cpu", "nvme", "AdamW", "WarmupLR", "1e-3"]),
)
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=20)

_known_keys = st.sampled_from([
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "zero_optimization", "gradient_clipping", "parallel", "autotuning",
    "tensor_parallel", "bfloat16", "elasticity", "aio", "activation_checkpointing"])
_block_keys = st.sampled_from([
    "stage", "offload_optimizer", "offload_param", "device", "nvme_path", "type", "params", "lr", "betas",
    "enabled", "cpu_offload", "reduce_bucket_size", "ratio", "space", "choices", "low", "high", "tp", "dp"])
_block = st.dictionaries(_block_keys, st.one_of(_json, st.dictionaries(_block_keys, _json, max_size=3)), max_size=4)
_configs = st.dictionaries(_known_keys, st.one_of(_json, _block), max_size=6)


def _check(data) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = validate_config(data)
        except ConfigError as e:
            assert e.problems and all(p.render() for p in e.problems)
        else:
            assert isinstance(result, TrainConfig)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs)
def test_config_shaped_json(data):
    _check(data)


@settings(max_examples=150, deadline=None)
@given(_json)
def test_any_json_value(data):
    _check(data)


@settings(max_examples=100, deadline=None)
@given(_configs)
def test_any_json_text_through_a_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.json"
    path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load_config(path)
        except ConfigError:
            pass
