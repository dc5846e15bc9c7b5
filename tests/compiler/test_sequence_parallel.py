"""Sequence parallelism in the compiler: the plan field, what it refuses, and its comm and memory
models (the runtime side: tests/runtime/test_tensor_parallel.py and test_comm_contract.py)."""

from __future__ import annotations

import pytest

from zeroplan.compiler import comm_volume, compile
from zeroplan.compiler.comm import ring_bytes, summarize
from zeroplan.compiler.emit import render
from zeroplan.compiler.memory import layer_activation_bytes
from zeroplan.compiler.shapes import stage_shapes, tp_replicated_tensors
from zeroplan.compiler.shards import padded
from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec


def _sp(data: dict, sp: bool = True) -> dict:
    return {**data, "parallel": {**data.get("parallel", {}), "sequence_parallel": sp}}


BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "parallel": {"tp": 2},
        "zero_optimization": {"stage": 1}}


def test_the_plan_and_its_report_record_it(compile_dict, config_of):
    plan = compile_dict(_sp(BASE), nproc_per_node=4)
    assert plan.parallel.sequence_parallel is True
    assert compile_dict(BASE, nproc_per_node=4).parallel.sequence_parallel is False
    report = render(plan, config=config_of(_sp(BASE)), model=ModelSpec.load("tiny"), cluster=ClusterSpec.load("cpu"))
    assert "| degrees | dp 2 x tp 2 x pp 1, sequence parallel |" in report["report.md"]
    assert "no key for Megatron-style sequence parallelism" in report["report.md"]


def test_at_tp_1_it_changes_no_estimate(compile_dict):
    one = {**BASE, "parallel": {"tp": 1}}
    on, off = compile_dict(_sp(one), nproc_per_node=2), compile_dict(one, nproc_per_node=2)
    assert on.parallel.sequence_parallel and on.estimates == off.estimates


def test_activation_all_reduces_become_gathers_and_scatters(tiny, compile_dict):
    on, off = compile_dict(_sp(BASE), nproc_per_node=4), compile_dict(BASE, nproc_per_node=4)
    (sent, calls), (sent_off, calls_off) = summarize(comm_volume(on, tiny)), summarize(comm_volume(off, tiny))
    m, layers = 2, tiny.layers
    activation = 4 * 2 * tiny.seq_len * tiny.hidden  # fp32, micro-batch 2, the whole sequence
    reduces = 4 * layers + 2  # plain tp per micro-batch: two per block each way, the embedding's, the head's
    assert calls_off["tp.all_reduce"] == m * reduces + 2 * m + 1  # + the loss's two, the norm
    regathers = 2 * layers + 1  # each column-parallel layer gathers its input again in backward
    assert calls["tp.all_gather"] == m * (reduces + regathers) and calls["tp.reduce_scatter"] == m * reduces
    assert sent["tp.all_gather"] + sent["tp.reduce_scatter"] == m * (
        reduces * ring_bytes("all_reduce", activation, 2) + regathers * ring_bytes("all_gather", activation, 2))
    assert calls["tp.all_reduce"] == 2 * m + 2  # the loss's two; the norm and the replicated gradients


def test_the_replicated_gradients_are_summed_once_per_step(tiny, compile_dict):
    on, off = compile_dict(_sp(BASE), nproc_per_node=4), compile_dict(BASE, nproc_per_node=4)
    shape = stage_shapes(tiny, tp=2, pp=1)[0]
    replicated = tp_replicated_tensors(tiny, shape)
    assert sum(replicated) == tiny.seq_len * tiny.hidden + (6 * tiny.layers + 2) * tiny.hidden
    shard = 4 * padded(replicated, world=2) // 2  # fp32, this dp rank's chunk of each
    loss = 2 * (ring_bytes("all_reduce", 4 * 2 * tiny.seq_len, 2) + ring_bytes("all_reduce", 8 * 2 * tiny.seq_len, 2))
    sent, sent_off = summarize(comm_volume(on, tiny))[0], summarize(comm_volume(off, tiny))[0]
    assert sent["tp.all_reduce"] == loss + ring_bytes("all_reduce", 4, 2) + ring_bytes("all_reduce", shard, 2)
    assert sent["dp.all_reduce"] == sent_off["dp.all_reduce"], "the dp collectives do not change"


def test_activations_split_by_tp_as_in_equation_4(compile_dict):
    shape = dict(seq=2048, micro=1, hidden=12288, heads=96, ffn=4 * 12288, element_bytes=2, dropout=True)
    whole = layer_activation_bytes(**shape)
    assert layer_activation_bytes(**shape, tp=8, sequence_parallel=True) == whole // 8
    on, off = compile_dict(_sp(BASE), nproc_per_node=4), compile_dict(BASE, nproc_per_node=4)
    assert on.estimates.memory_per_rank["activations"] < off.estimates.memory_per_rank["activations"]


def test_a_sequence_tp_does_not_divide_is_refused(tiny, config_of):
    model = tiny.model_copy(update={"seq_len": 130, "name": "odd"})
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: seq_len\(130\) of model odd is not divisible "
                       r"by tp\(4\).*change parallel.tp to a divisor of 130"):
        compile(config_of(_sp({**BASE, "parallel": {"tp": 4}})), model, ClusterSpec.load("cpu"), nproc_per_node=4)


@pytest.mark.parametrize("parallel, model, fragment", [
    ({"tp": 2, "pp": 2}, "tiny", r"sequence parallelism with pp\(2\) > 1 is not supported"),
    ({"tp": 2}, "1b", "is a llama; sequence parallelism is implemented for the built-in GPT's layers only"),
])
def test_what_the_runtime_cannot_run_is_refused(parallel, model, fragment, config_of):
    spec = ModelSpec.load(model)
    with pytest.raises(ConfigError, match=fragment):
        compile(config_of(_sp({**BASE, "parallel": parallel})), spec, ClusterSpec.load("cpu"), nproc_per_node=4)
