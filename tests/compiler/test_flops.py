"""The FLOPs count and the profiler's plan section, torch-free: compiler/flops.py is the
textbook count for the built-in GPT (Narayanan et al. 2021, section 5.1: 24·B·s·L·h² + 4·B·s²·L·h
+ 2·B·s·h·V per forward), the cost model times exactly it, and `flops_profiler` compiles to a
plan section with the cluster's peak in the training dtype, no notice, and a ds_config export
DeepSpeed reads back."""

from __future__ import annotations

import warnings

import pytest

from zeroplan.compiler import compile
from zeroplan.compiler.cost import compute_seconds
from zeroplan.compiler.deepspeed import ds_config
from zeroplan.compiler.flops import step_flops
from zeroplan.compiler.shapes import stage_shapes
from zeroplan.schemas import ClusterSpec, ConfigError, ConfigWarning, ModelSpec, load_config

PROFILER = {"enabled": True, "profile_step": 3, "module_depth": 2, "top_modules": 4, "detailed": False,
            "recompute_fwd_factor": 1.0, "output_file": ""}


def test_the_gpt_forward_is_the_textbook_count(tiny):
    b, s, L, h, V = 4, tiny.seq_len, tiny.layers, tiny.hidden, tiny.vocab
    flops = step_flops(tiny, tokens=b * s, layers=L, head=True)
    assert tiny.ffn == 4 * h
    assert flops.forward == 24 * b * s * L * h * h + 4 * b * s * s * L * h + 2 * b * s * h * V
    attention = 4 * b * s * s * L * h  # fused: the backward recomputes the scores, 2.5x
    assert flops.backward == 2 * (flops.forward - attention) + 5 * attention // 2
    eager = step_flops(tiny.model_copy(update={"attention": "eager"}), tokens=b * s, layers=L, head=True)
    assert eager.backward == 2 * eager.forward and eager.recompute == 0


def test_checkpointing_recomputes_the_blocks_not_the_head(tiny):
    plain = step_flops(tiny, tokens=512, layers=tiny.layers, head=True)
    again = step_flops(tiny, tokens=512, layers=tiny.layers, head=True, recompute=True)
    blocks = step_flops(tiny, tokens=512, layers=tiny.layers, head=False)
    assert again.recompute == blocks.forward and again.model == plain.total


def test_tensor_parallel_ranks_split_every_product(tiny):
    whole = step_flops(tiny, tokens=512, layers=tiny.layers, head=True)
    half = step_flops(tiny, tokens=512, layers=tiny.layers, head=True, tp=2)
    assert 2 * half.forward == whole.forward and 2 * half.backward == whole.backward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_cost_model_times_the_same_count(compile_dict, tiny, checkpointing):
    plan = compile_dict({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                         "activation_checkpointing": {"enabled": checkpointing}}, nproc_per_node=2)
    cluster = ClusterSpec.load("cpu")
    shape, = stage_shapes(tiny, tp=1, pp=1)
    flops = step_flops(tiny, tokens=2 * 2 * tiny.seq_len, layers=tiny.layers, head=True, recompute=checkpointing)
    assert compute_seconds(plan, tiny, cluster, shape) == flops.total / cluster.rates.matmul_flops_fp32


@pytest.mark.parametrize("bf16", [False, True])
def test_the_profiler_section_carries_the_clusters_peak(bf16):
    data = {"train_batch_size": 8, "flops_profiler": PROFILER, **({"bf16": {"enabled": True}} if bf16 else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # acted on: no notice
        config = load_config(data)
    cluster = ClusterSpec.load("h100-80")
    plan = compile(config, ModelSpec.load("tiny"), cluster, nproc_per_node=2)
    section = plan.monitors.flops_profiler
    rates = cluster.rates
    assert section.peak_flops == (rates.matmul_flops_16bit if bf16 else rates.matmul_flops_fp32)
    assert section.peak_source == "nominal" and section.output_file is None  # "" prints, as in DeepSpeed
    assert (section.profile_step, section.module_depth, section.top_modules, section.detailed,
            section.recompute_fwd_factor) == (3, 2, 4, False, 1.0)
    exported = ds_config(plan)["flops_profiler"]
    assert exported == {**PROFILER, "output_file": None}
    again = load_config({**ds_config(plan)}, world_size=2)
    assert compile(again, ModelSpec.load("tiny"), cluster, nproc_per_node=2).monitors == plan.monitors


def test_a_disabled_profiler_has_no_section(compile_dict):
    plan = compile_dict({"train_batch_size": 8, "flops_profiler": {**PROFILER, "enabled": False}}, nproc_per_node=2)
    assert plan.monitors.flops_profiler is None


def test_module_depth_below_minus_one_is_refused():
    with pytest.raises(ConfigError, match="flops_profiler.module_depth"):
        load_config({"train_batch_size": 8, "flops_profiler": {"module_depth": -2}})
