"""Communication volumes per stage, in ring-algorithm bytes (compiler/comm.py)."""

from __future__ import annotations

import pytest

from zeroplan.compiler import comm_volume
from zeroplan.compiler.comm import PIPE_HEADER_ELEMENTS, ring_bytes, summarize
from zeroplan.compiler.shapes import stage_shapes
from zeroplan.compiler.shards import pack_buckets, padded
from zeroplan.schemas import ModelSpec


def _sent(plan, model="tiny"):
    return summarize(comm_volume(plan, ModelSpec.load(model)))


def test_ring_factors():
    assert ring_bytes("all_reduce", 1000, 4) == 2 * 3 * 1000 // 4
    assert ring_bytes("all_gather", 1000, 4) == 3 * 1000 // 4
    assert ring_bytes("reduce_scatter", 1000, 1) == 0


def test_stage0_all_reduces_gradients_in_buckets(tiny, compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1,
                         "zero_optimization": {"stage": 0, "reduce_bucket_size": 100_000}}, nproc_per_node=4)
    sent, calls = _sent(plan)
    psi, tensors = tiny.total_params, stage_shapes(tiny, tp=1, pp=1)[0].tensors
    flags = ring_bytes("all_reduce", len(tensors), 4)  # a byte per tensor: which got a gradient
    assert sent == {"dp.all_reduce": 2 * 3 * psi * 4 // 4 + flags}
    buckets = pack_buckets(tensors, world=1, max_elements=100_000, reverse=True)
    assert calls == {"dp.all_reduce": len(buckets) + 1} and len(buckets) >= -(-psi // 100_000)  # whole tensors


def test_stage3_moves_one_and_a_half_times_the_bytes_of_stage0(tiny, compile_dict):
    base = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}
    zero0 = compile_dict({**base, "zero_optimization": {"stage": 0}}, nproc_per_node=4)
    zero3 = compile_dict({**base, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
                         nproc_per_node=4)
    total0, total3 = sum(_sent(zero0)[0].values()), sum(_sent(zero3)[0].values())
    # Rajbhandari et al. 2020, section 7.2.2: 3 Psi vs 2 Psi. The runtime also gathers the tied
    # LM head's matrix (the embedding, V elements) again in forward and backward, and does not
    # gather the embeddings (E elements) again in backward (their backward needs only indices).
    shape = stage_shapes(tiny, tp=1, pp=1)[0]
    embeddings = sum(shape.modules[i][0] for i in shape.embedding_modules)
    head = shape.modules[-1][0]
    extra = ring_bytes("all_gather", 2 * (2 * head - embeddings), 4) + ring_bytes("all_reduce", 4, 4)
    assert total3 == pytest.approx(1.5 * total0 + extra, rel=1e-3)  # padding to multiples of 4 aside


def test_stage2_reduce_scatters_every_micro_batch(tiny, compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 3,
                         "zero_optimization": {"stage": 2}}, nproc_per_node=2)
    sent, _ = _sent(plan)
    psi = tiny.total_params
    assert sent["dp.reduce_scatter"] == 3 * (psi * 4 // 2)
    assert sent["dp.all_gather"] == psi * 4 // 2  # updated parameters, once per step


def test_stage1_without_reduce_scatter_all_reduces_once_per_step(tiny, compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 3,
                         "zero_optimization": {"stage": 1, "reduce_scatter": False}}, nproc_per_node=2)
    sent, _ = _sent(plan)
    tensors = stage_shapes(tiny, tp=1, pp=1)[0].tensors
    padded_bytes = padded(tensors, world=2) * 4
    # the gradients once; the norm's 4 bytes; a byte per tensor saying which got a gradient
    assert sent["dp.all_reduce"] == 2 * (padded_bytes // 2) + 4 + len(tensors)


def test_tensor_parallel_all_reduces_four_times_per_block(tiny, compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 2, "parallel": {"tp": 2}}, nproc_per_node=2)
    sent, calls = _sent(plan)
    tokens = tiny.seq_len * 2
    activation = 4 * tokens * tiny.hidden
    # + the embedding's sum and the LM head's input gradient; the loss's two and the norm's one are small
    assert calls["tp.all_reduce"] == 4 * tiny.layers + 2 + 2 + 1
    small = 4 * tokens + 8 * tokens + 4  # the loss's row maxima and [sum of exp, target], the norm
    assert sent["tp.all_reduce"] == (4 * tiny.layers + 2) * activation + small  # 2(t-1)/t = 1 at t = 2


def test_pipeline_sends_a_header_and_an_activation_per_micro_batch_and_boundary(tiny, compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
                         "parallel": {"pp": 2}}, nproc_per_node=2)
    sent, calls = _sent(plan)  # the first stage: it sends the headers and sums the tied embedding
    activation = 4 * tiny.seq_len * tiny.hidden
    assert calls["pp.send_recv"] == 4 * 2
    assert sent["pp.send_recv"] == 4 * (activation + 8 * PIPE_HEADER_ELEMENTS)
    # the tied embedding's fp32 gradient (whole at ZeRO 0, over its 2 stages) and the norm's 4 bytes
    assert calls["pp.all_reduce"] == 2
    assert sent["pp.all_reduce"] == ring_bytes("all_reduce", 4 * tiny.vocab * tiny.hidden, 2) + 4


def test_pipeline_tied_sum_is_the_zero_shard_and_fp16_agrees_its_overflow_flag_once_over_the_world(
        tiny, compile_dict):
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 1}, "fp16": {"enabled": True}, "parallel": {"pp": 2, "tp": 2}}
    plan = compile_dict(config, nproc_per_node=16)  # dp 4
    sent, calls = _sent(plan)
    shard = 4 * -(-tiny.vocab * tiny.hidden // 2 // 4)  # the vocab half's dp shard, fp32
    assert calls["pp.all_reduce"] == 2  # the tied embedding's shard and the norm
    assert sent["pp.all_reduce"] == ring_bytes("all_reduce", shard, 2) + 4
    assert calls["world.all_reduce"] == 1 and sent["world.all_reduce"] == ring_bytes("all_reduce", 4, 16)
    fp32_sent, fp32_calls = _sent(compile_dict({**config, "fp16": {"enabled": False}}, nproc_per_node=16))
    assert "world.all_reduce" not in fp32_calls  # nothing else is agreed over the world
    assert {k: v for k, v in calls.items() if k != "world.all_reduce"} == fp32_calls
    activation = 2 * tiny.seq_len * tiny.hidden  # fp16, whole on every tp rank
    assert sent["pp.send_recv"] == 2 * (activation + 8 * PIPE_HEADER_ELEMENTS)


@pytest.mark.parametrize("method, blocks", [("parameters", [1, 2, 2, 1]), ("uniform", [1, 2, 2, 1]),
                                           ("type:Block", [2, 2, 2, 0]), ("type:conv", [2, 2, 2, 0])])
def test_stages_follow_the_plans_partition_method(tiny, compile_dict, method, blocks):
    """The embeddings and head weigh about a block each, so 'parameters' and 'uniform' give the
    end stages one block; 'type:Block' balances the blocks alone. A regex that matches none of
    the built-in GPT's layer classes is read as naming the blocks, with a warning."""
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
                         "parallel": {"pp": 4, "pipeline": {"partition_method": method}}}, nproc_per_node=4)
    assert [s.layers for s in stage_shapes(tiny, tp=1, pp=4, method=method)] == blocks
    noted = any("matches none of the built-in GPT's pipeline layer classes" in w for w in plan.estimates.warnings)
    assert noted == (method == "type:conv")


def test_a_single_rank_communicates_nothing(compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1}, nproc_per_node=1)
    assert plan.estimates.comm_bytes_per_step == {}
