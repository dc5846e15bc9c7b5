"""The plan's communication estimate is what the runtime does: for compiled plans of the tiny
GPT (ZeRO 0-3, with and without tensor parallelism, fp16, reduce_scatter off), one optimizer
step's logged collectives equal `estimates.comm_messages_per_step` call for call and
`comm_bytes_per_step` byte for byte (the logged tensor sizes through the compiler's ring
accounting). Bucket packing and ZeRO-3's persistence and gather order come from one
definition each (compiler/shards.py, compiler/shapes.py), which the runtime imports.

Pipeline parallelism is not covered yet: the runtime sends a shape header before each
activation, sums each stage's fp32 share of the tied embedding (the comm model counts the
whole matrix) and logs its collectives beside the dp group's."""

from __future__ import annotations

import functools
import warnings

import pytest

from rt_spawn import job_result, spawn_jobs
from zeroplan.compiler import compile as compile_plan
from zeroplan.compiler.comm import ring_bytes
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ConfigWarning, validate_config

OPS = {"all_reduce": "all_reduce", "reduce_scatter_tensor": "reduce_scatter", "all_gather_into_tensor": "all_gather"}


def _plan(stage: int, *, tp: int = 1, dp: int = 2, fp16: bool = False, **zero):
    data = {"train_batch_size": 4 * dp, "train_micro_batch_size_per_gpu": 2, "parallel": {"tp": tp},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200_000, "allgather_bucket_size": 300_000,
                                  "stage3_param_persistence_threshold": 1000, **zero}}
    if fp16:  # a small initial scale: the step must not overflow (it would skip the all-gather)
        data["fp16"] = {"enabled": True, "initial_scale_power": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        config = validate_config(data)
    return compile_plan(config, MODEL_PRESETS["tiny"], CLUSTER_PRESETS["cpu"], nproc_per_node=dp * tp)


CASES = {
    2: {**{f"z{s}": functools.partial(_plan, s) for s in range(4)},
        "z2-fp16": functools.partial(_plan, 2, fp16=True), "z1-all-reduce": functools.partial(_plan, 1, reduce_scatter=False),
        "z3-no-prefetch": functools.partial(_plan, 3, stage3_prefetch_bucket_size=0)},
    4: {f"z{s}-tp2": functools.partial(_plan, s, tp=2) for s in range(4)},
}
ALL = [(world, name) for world, cases in CASES.items() for name in cases]


@functools.lru_cache(maxsize=None)
def _plans(world: int) -> dict:
    return {name: make() for name, make in CASES[world].items()}


@functools.lru_cache(maxsize=None)
def _spawned(world: int) -> dict:
    return spawn_jobs(world, [(name, "compiled_step_comms", {"plan_json": plan.to_json()})
                              for name, plan in _plans(world).items()])


@pytest.mark.parametrize("world, name", ALL, ids=[name for _, name in ALL])
def test_one_step_communicates_what_the_plan_predicts(world, name):
    plan = _plans(world)[name]
    got = job_result(_spawned(world), name)
    assert got["skipped"] == 0, "an fp16 overflow would skip the step's all-gather"
    calls, sent = {}, {}
    for logged, c in got["comms"].items():
        dim, _, op = logged.rpartition(".")
        key = f"{dim or 'dp'}.{OPS[op]}"
        n = plan.parallel.tp if dim == "tp" else plan.parallel.dp
        calls[key] = calls.get(key, 0) + c["count"]
        sent[key] = sent.get(key, 0) + ring_bytes(OPS[op], c["bytes"], n)
    assert calls == plan.estimates.comm_messages_per_step
    assert sent == plan.estimates.comm_bytes_per_step
