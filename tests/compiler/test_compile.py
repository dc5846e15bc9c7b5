"""compile(): determinism, JSON round trip, degree and batch errors, defaults, "auto"."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from zeroplan.compiler import compile
from zeroplan.compiler.shapes import rank_params
from zeroplan.schemas import MODEL_PRESETS, ClusterSpec, ConfigError, ModelSpec, Plan
from zeroplan.schemas.optim import SCHEDULER_DEFAULTS

BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}


def test_plans_round_trip_through_json_exactly(compile_dict, tmp_path):
    plan = compile_dict({**BASE, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                         "scheduler": {"type": "WarmupLR"}}, nproc_per_node=2)
    assert Plan.model_validate_json(plan.to_json()) == plan
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan


def test_compile_is_deterministic(compile_dict):
    data = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "zero_optimization": {"stage": "auto"}}
    first = compile_dict(data, model="small", nproc_per_node=2, resolve_auto=True)
    assert compile_dict(data, model="small", nproc_per_node=2, resolve_auto=True).to_json() == first.to_json()


def test_schemas_and_compiler_import_no_torch():
    code = "import zeroplan.schemas, zeroplan.compiler, zeroplan.compiler.emit, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_hash_is_sha256_of_the_canonical_config(compile_dict, config_of):
    plan = compile_dict(BASE, nproc_per_node=1)
    data = config_of(BASE).model_dump(mode="json", exclude={"json_schema"})
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert plan.provenance.config_hash == hashlib.sha256(text.encode()).hexdigest()


def test_degree_product_error_echoes_the_numbers(compile_dict):
    with pytest.raises(ConfigError) as e:
        compile_dict({**BASE, "parallel": {"dp": 2, "tp": 4, "pp": 2}}, model="7b", cluster="h100-80")
    text = str(e.value)
    assert "dp(2) * tp(4) * pp(2) = 16 != world_size(8)" in text
    assert "change parallel.dp or parallel.tp or parallel.pp or --nproc-per-node" in text


def test_tp_and_pp_that_do_not_divide_the_world(compile_dict):
    with pytest.raises(ConfigError, match=r"tp\(4\) \* pp\(1\) = 4 does not divide world_size\(6\)"):
        compile_dict({**BASE, "parallel": {"tp": 4}}, nproc_per_node=6)


def test_model_shape_errors_are_all_reported(compile_dict):
    with pytest.raises(ConfigError) as e:
        compile_dict({**BASE, "parallel": {"tp": 8}, "zero_optimization": {"stage": 3}}, nproc_per_node=8)
    paths = [p.path for p in e.value.problems]
    assert "tp(8) does not divide heads(4) of model tiny" in str(e.value)
    assert paths.count("parallel.tp") >= 1
    with pytest.raises(ConfigError) as e:
        compile_dict({**BASE, "parallel": {"pp": 8}, "zero_optimization": {"stage": 3}}, nproc_per_node=8)
    messages = str(e.value)
    assert "pp(8) > layers(6) of model tiny" in messages and "ZeRO stage 3 with pp(8) > 1" in messages


def test_batch_error_names_given_and_derived(compile_dict):
    with pytest.raises(ConfigError) as e:
        compile_dict({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1},
                     nproc_per_node=2)
    assert e.value.problems[0].path == "train_batch_size"
    assert "train_batch_size 12 (given) != micro-batch 3 (given) x grad accumulation 1 (given) x dp 2" in str(e.value)


def test_defaults_fill_optimizer_and_scheduler(compile_dict):
    plan = compile_dict({**BASE, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}},
                        nproc_per_node=1)
    assert (plan.optimizer.type, plan.optimizer.lr) == ("AdamW", 1e-3)
    assert plan.scheduler.params == {**SCHEDULER_DEFAULTS["WarmupDecayLR"], "total_num_steps": 50}


@pytest.mark.parametrize("cluster, offload, kernel", [
    ("h100-80", "none", "cuda_fused"), ("h100-80", "cpu", "cpu_adam"),
    ("cpu", "none", "torch_fused"), ("cpu", "cpu", "cpu_adam"),
])
def test_optimizer_kernel_follows_device_and_offload(compile_dict, cluster, offload, kernel):
    data = {**BASE, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": offload}}}
    assert compile_dict(data, cluster=cluster, nproc_per_node=2).kernels.optimizer == kernel


def test_performance_autos_are_refused_all_at_once_and_rule_autos_are_not(compile_dict):
    data = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": "auto"}}
    with pytest.raises(ConfigError) as e:
        compile_dict(data, nproc_per_node=2)
    # bf16 has a rule; train_batch_size is derived once the micro-batch is known.
    assert [p.path for p in e.value.problems] == ["train_micro_batch_size_per_gpu", "zero_optimization.stage"]
    assert "zeroplan autotune" in str(e.value) and "per_device_train_batch_size" in str(e.value)


@pytest.mark.parametrize("cluster, dtype", [("h100-80", "bf16"), ("cpu", "fp32")])
def test_auto_precision_is_resolved_and_recorded(compile_dict, cluster, dtype):
    plan = compile_dict({**BASE, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, cluster=cluster,
                        nproc_per_node=1, resolve_auto=True)
    assert plan.precision.param_dtype == dtype
    assert set(plan.provenance.resolved_auto) == {"bf16.enabled", "fp16.enabled"}


def test_resolved_search_picks_a_fitting_plan_and_says_why(compile_dict):
    data = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto"}}
    plan = compile_dict(data, model="7b", cluster="a100-40", resolve_auto=True)
    decided = plan.provenance.resolved_auto
    assert sum(plan.estimates.memory_per_rank.values()) <= 0.9 * plan.estimates.memory_limit_per_rank
    assert plan.zero.reduce_bucket_size == 4096 * 4096
    assert decided["zero_optimization.stage"].startswith(f"{plan.zero.stage}: fastest of")
    assert not plan.estimates.warnings or all("does not fit" not in w for w in plan.estimates.warnings)


def test_total_num_steps_auto_cannot_be_derived(compile_dict):
    data = {**BASE, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}}
    with pytest.raises(ConfigError, match="scheduler.params.total_num_steps: is 'auto', which Hugging Face's Trainer"):
        compile_dict(data, nproc_per_node=1, resolve_auto=True)


def test_a_plan_that_does_not_fit_compiles_with_a_warning(compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1}, model="70b", cluster="a100-40")
    assert any(w.startswith("does not fit") for w in plan.estimates.warnings)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_rank_params_without_parallelism_is_the_model_size(name):
    model = MODEL_PRESETS[name]
    assert rank_params(model, tp=1, pp=1) == model.total_params


def test_tensor_and_pipeline_parallel_split_the_parameters():
    model = ModelSpec.load("7b")
    assert rank_params(model, tp=8, pp=1) < model.total_params / 7
    assert rank_params(model, tp=1, pp=4) < model.total_params / 3


def test_reshaping_the_cluster_checks_counts():
    with pytest.raises(ConfigError, match="--nproc-per-node"):
        compile(None, ModelSpec.load("tiny"), ClusterSpec.load("cpu"), nproc_per_node=0)


def test_a_bucket_larger_than_the_model_is_warned_about_at_stages_2_and_3():
    from zeroplan.compiler import compile
    from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, load_config

    def warnings_for(stage: int, bucket: float) -> list[str]:
        cfg = load_config({"train_batch_size": 4, "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket}})
        plan = compile(cfg, MODEL_PRESETS["medium"], CLUSTER_PRESETS["cpu"], nproc_per_node=2)
        return [w for w in plan.estimates.warnings if "reduce_bucket_size" in w]

    (warning,) = warnings_for(3, 5e8)
    assert "holds the whole model (98,032,128 parameters per rank)" in warning
    assert warnings_for(3, 5e6) == [] and warnings_for(1, 5e8) == []


def test_an_nvme_swap_tile_holding_the_whole_shard_is_warned_about(tmp_path):
    from zeroplan.compiler import compile
    from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, load_config

    def warnings_for(sub_group_size: float) -> list[str]:
        cfg = load_config({"train_batch_size": 4, "zero_optimization": {
            "stage": 2, "sub_group_size": sub_group_size, "reduce_bucket_size": 5e6,
            "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}})
        plan = compile(cfg, MODEL_PRESETS["medium"], CLUSTER_PRESETS["cpu"], nproc_per_node=2)
        return [w for w in plan.estimates.warnings if "swap tile" in w]

    (warning,) = warnings_for(1e9)
    assert "whole optimizer shard (49,016,064 elements per rank)" in warning
    assert "zero_optimization.sub_group_size" in warning
    assert warnings_for(5e6) == []
