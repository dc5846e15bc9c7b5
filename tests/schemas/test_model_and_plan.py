"""ModelSpec arithmetic and the Plan's JSON round trip."""

from __future__ import annotations

import pytest

from zeroplan.schemas import MODEL_PRESETS, ConfigError, ModelSpec, Plan
from zeroplan.schemas.batch import BatchPlan
from zeroplan.schemas.plan import ParallelPlan, SchedulerPlan, WorldPlan, ZeroPlan


@pytest.mark.parametrize("name, billions", [("1b", 1.236), ("7b", 6.738), ("13b", 13.016), ("70b", 68.977)])
def test_llama_presets_match_published_parameter_counts(name, billions):
    assert MODEL_PRESETS[name].total_params / 1e9 == pytest.approx(billions, abs=0.001)


def test_gpt_layer_arithmetic_is_12h2_plus_13h():
    spec = MODEL_PRESETS["small"]
    h = spec.hidden
    assert spec.layer_params == 12 * h * h + 13 * h
    assert spec.total_params == spec.vocab * h + spec.seq_len * h + spec.layers * spec.layer_params + 2 * h


@pytest.mark.parametrize("name, millions", [("tiny", 1.5), ("small", 25), ("medium", 100)])
def test_builtin_presets_are_about_their_advertised_size(name, millions):
    assert MODEL_PRESETS[name].total_params / 1e6 == pytest.approx(millions, rel=0.05)


def test_model_spec_shape_errors_and_loading(tmp_path):
    with pytest.raises(ValueError, match=r"hidden\(100\) is not divisible by heads\(3\)"):
        ModelSpec(name="x", layers=1, hidden=100, heads=3, ffn=4, vocab=10, seq_len=4)
    path = tmp_path / "m.json"
    path.write_text(MODEL_PRESETS["tiny"].model_dump_json())
    assert ModelSpec.load(path) == MODEL_PRESETS["tiny"]
    assert ModelSpec.load("tiny") is MODEL_PRESETS["tiny"]
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelSpec.load("gpt-17")


def _plan(**zero) -> Plan:
    return Plan(
        world=WorldPlan(nnodes=1, nproc_per_node=2, world_size=2),
        parallel=ParallelPlan(dp=2),
        batch=BatchPlan(global_batch_size=8, micro_batch_size=2, gradient_accumulation_steps=2),
        zero=ZeroPlan(stage=2, reduce_bucket_size=500_000_000, allgather_bucket_size=500_000_000, overlap_comm=True,
                      prefetch_bucket_size=50_000_000, param_persistence_threshold=100_000,
                      model_persistence_threshold=2**63 - 1, max_live_parameters=10**9, max_reuse_distance=10**9,
                      sub_group_size=10**9, **zero),
        scheduler=SchedulerPlan(type="WarmupLR", params={"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                          "warmup_num_steps": 10, "warmup_type": "log"}),
    )


def test_plan_round_trips_through_json_exactly(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "out" / "plan.json")
    assert Plan.load(path) == plan
    assert Plan.load(path).to_json() == plan.to_json()
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left


def test_plan_is_frozen_and_checks_its_arithmetic():
    plan = _plan()
    with pytest.raises(Exception):
        plan.zero = None  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"dp\(2\) \* tp\(1\) \* pp\(1\) != world_size\(4\)"):
        Plan(**{**plan.model_dump(), "world": {"nnodes": 1, "nproc_per_node": 4, "world_size": 4}})


def test_plan_of_another_version_or_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(_plan().to_json().replace('"plan_version": 2', '"plan_version": 99'))
    with pytest.raises(ConfigError, match="reads plan version 2"):
        Plan.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="plan.json"):
        Plan.load(path)
    with pytest.raises(ConfigError, match="cannot read plan"):
        Plan.load(tmp_path / "missing.json")
