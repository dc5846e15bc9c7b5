"""The plan's communication estimate is what the runtime does: for compiled plans of the tiny
GPT (ZeRO 0-3, with and without tensor parallelism, with sequence parallelism and recomputed
blocks, tp-partitioned checkpoints, fp16 (with tp too), reduce_scatter off, Lamb's per-tensor
norms) and of the small one (whose embedding matrix is published into its own storage at
stages 1 and 3), one optimizer
step's logged collectives equal `estimates.comm_messages_per_step` call for call and
`comm_bytes_per_step` byte for byte (the logged tensor sizes through the compiler's ring
accounting). Bucket packing and ZeRO-3's persistence and gather order come from one
definition each (compiler/shards.py, compiler/shapes.py), which the runtime imports.

With pipeline parallelism (pp 2, ZeRO 0-2, with dp 2 or tp 2, the tied embedding, fp16, a
partition method other than the default) every rank's step equals the compiler's collectives
of its stage (`stage_collectives`; the plan's estimate is the busiest stage's): the `pp.send`
of headers, activations and gradients as `pp.send_recv`, the tied embedding's and the norm's
`pp.all_reduce`, fp16's overflow flag as one `world.all_reduce` (with tp too); every message sent is received once; and each rank holds
the parameter tensors of its compiled stage (compiler/partition.py cuts both). A collective
over a one-rank group (dp 1) sends nothing, and the plan leaves it out."""

from __future__ import annotations

import functools
import warnings

import pytest

from rt_spawn import job_result, spawn_jobs
from zeroplan.compiler import compile as compile_plan
from zeroplan.compiler.comm import ring_bytes, stage_collectives, summarize
from zeroplan.compiler.shapes import stage_shapes
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ConfigWarning, validate_config

OPS = {"all_reduce": "all_reduce", "reduce_scatter_tensor": "reduce_scatter", "all_gather_into_tensor": "all_gather"}


def _plan(stage: int, *, tp: int = 1, dp: int = 2, pp: int = 1, fp16: bool = False, method: str = "parameters",
          sp: bool = False, checkpointing: bool = False, partition: bool | None = None, optimizer: dict | None = None,
          model: str = "tiny", **zero):
    parallel = {"tp": tp, "pp": pp, "pipeline": {"partition_method": method}}
    data = {"train_batch_size": 4 * dp, "train_micro_batch_size_per_gpu": 2, "parallel": parallel,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200_000, "allgather_bucket_size": 300_000,
                                  "stage3_param_persistence_threshold": 1000, **zero}}
    if fp16:  # a small initial scale: the step must not overflow (it would skip the all-gather)
        data["fp16"] = {"enabled": True, "initial_scale_power": 8}
    data["parallel"]["sequence_parallel"] = sp
    if optimizer is not None:
        data["optimizer"] = optimizer
    if checkpointing:  # recomputed blocks; partitioned checkpoints gather nothing with sequence parallelism
        partitioned = sp if partition is None else partition
        data["activation_checkpointing"] = {"enabled": True, "partition_activations": partitioned}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        config = validate_config(data)
    return compile_plan(config, MODEL_PRESETS[model], CLUSTER_PRESETS["cpu"], nproc_per_node=dp * tp * pp)


CASES = {
    2: {**{f"z{s}": functools.partial(_plan, s) for s in range(4)},
        "z2-fp16": functools.partial(_plan, 2, fp16=True), "z1-all-reduce": functools.partial(_plan, 1, reduce_scatter=False),
        "z3-no-prefetch": functools.partial(_plan, 3, stage3_prefetch_bucket_size=0),
        "z3-tp2-sp": functools.partial(_plan, 3, dp=1, tp=2, sp=True),
        "z2-lamb": functools.partial(_plan, 2, optimizer={"type": "Lamb"}),
        # the small preset's embedding matrix is published into its own storage (IN_PLACE_MIN)
        "z1-small": functools.partial(_plan, 1, model="small"),
        "z3-small-persistent": functools.partial(_plan, 3, model="small", stage3_param_persistence_threshold=10**7)},
    4: {**{f"z{s}-tp2": functools.partial(_plan, s, tp=2) for s in range(4)},
        **{f"z{s}-tp2-sp": functools.partial(_plan, s, tp=2, sp=True) for s in range(4)},
        "z1-tp2-sp-checkpointing": functools.partial(_plan, 1, tp=2, sp=True, checkpointing=True),
        "z2-tp2-partitioned-checkpoints": functools.partial(_plan, 2, tp=2, checkpointing=True, partition=True),
        "z1-tp2-fp16": functools.partial(_plan, 1, tp=2, fp16=True)},
}
PP_CASES = {
    2: {"pp2-z0": functools.partial(_plan, 0, dp=1, pp=2),
        "pp2-z1-fp16-blocks-and-head": functools.partial(_plan, 1, dp=1, pp=2, fp16=True, method="type:Block|Head")},
    4: {"dp2-pp2-z0": functools.partial(_plan, 0, pp=2), "dp2-pp2-z1-fp16": functools.partial(_plan, 1, pp=2, fp16=True),
        "dp2-pp2-z2": functools.partial(_plan, 2, pp=2), "tp2-pp2-z1": functools.partial(_plan, 1, dp=1, tp=2, pp=2)},
}
ALL = [(world, name) for world, cases in CASES.items() for name in cases]
ALL_PP = [(world, name) for world, cases in PP_CASES.items() for name in cases]


@functools.lru_cache(maxsize=None)
def _plans(world: int) -> dict:
    return {name: make() for name, make in {**CASES[world], **PP_CASES[world]}.items()}


@functools.lru_cache(maxsize=None)
def _spawned(world: int) -> dict:
    """Every case of this world size in one spawn."""
    return spawn_jobs(world, [(name, "compiled_step_comms", {"plan_json": plan.to_json(),
                                                             "every_rank": name in PP_CASES[world],
                                                             "model": "small" if "small" in name else "tiny"})
                              for name, plan in _plans(world).items()])


def _as_planned(comms: dict, plan) -> tuple[dict, dict, dict]:
    """Logged comms as the plan's (calls, bytes) per `dim.op`, and what was received (pp.recv)."""
    p = plan.parallel
    calls, sent, received = {}, {}, {"count": 0, "bytes": 0}
    for logged, c in comms.items():
        dim, _, op = logged.rpartition(".")
        dim = dim or "dp"
        n = {"dp": p.dp, "tp": p.tp, "pp": p.pp, "world": p.dp * p.tp * p.pp}[dim]
        if n == 1:
            continue
        if op == "recv":
            received = {k: received[k] + c[k] for k in received}
            continue
        key = f"{dim}.{'send_recv' if op == 'send' else OPS[op]}"
        calls[key] = calls.get(key, 0) + c["count"]
        sent[key] = sent.get(key, 0) + (c["bytes"] if op == "send" else ring_bytes(OPS[op], c["bytes"], n))
    return calls, sent, received


@pytest.mark.parametrize("world, name", ALL, ids=[name for _, name in ALL])
def test_one_step_communicates_what_the_plan_predicts(world, name):
    plan = _plans(world)[name]
    got = job_result(_spawned(world), name)
    assert got["skipped"] == 0, "an fp16 overflow would skip the step's all-gather"
    calls, sent, _ = _as_planned(got["comms"], plan)
    assert calls == plan.estimates.comm_messages_per_step
    assert sent == plan.estimates.comm_bytes_per_step


@pytest.mark.parametrize("world, name", ALL_PP, ids=[name for _, name in ALL_PP])
def test_every_pipeline_stage_communicates_what_the_plan_predicts(world, name):
    plan, spec = _plans(world)[name], MODEL_PRESETS["tiny"]
    p = plan.parallel
    shapes = stage_shapes(spec, tp=p.tp, pp=p.pp, method=p.pipeline_partition_method)
    ranks = job_result(_spawned(world), name)
    assert all(r["skipped"] == 0 for r in ranks), "an fp16 overflow would skip the step's norm"
    stages, sends, recvs = set(), {"count": 0, "bytes": 0}, {"count": 0, "bytes": 0}
    for rank, got in enumerate(ranks):
        shape = shapes[got["stage"]]
        assert got["numels"] == list(shape.tensors), f"rank {rank} does not hold stage {shape.index}'s parameters"
        calls, sent, received = _as_planned(got["comms"], plan)
        want_sent, want_calls = summarize(stage_collectives(plan, spec, shape))
        assert (calls, sent) == (want_calls, want_sent), f"rank {rank}, stage {shape.index}"
        stages.add(shape.index)
        sends = {"count": sends["count"] + calls["pp.send_recv"], "bytes": sends["bytes"] + sent["pp.send_recv"]}
        recvs = {k: recvs[k] + received[k] for k in recvs}
    assert stages == set(range(p.pp)) and recvs == sends
    busiest = max(shapes, key=lambda s: sum(c.bytes for c in stage_collectives(plan, spec, s)))
    assert plan.estimates.comm_bytes_per_step == summarize(stage_collectives(plan, spec, busiest))[0]
