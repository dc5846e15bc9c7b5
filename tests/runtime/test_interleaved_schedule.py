"""Interleaved 1F1B as data (runtime/parallel/pipeline_schedules.py): its order, its bubble by simulation
against the cost model's, and the refusal of an interleaved plan by `initialize` and `zeroplan
train` (the runtime has no executor for it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zeroplan.compiler import compile
from zeroplan.compiler.cost import bubble_fraction
from zeroplan.compiler.memory import in_flight
from zeroplan.runtime import initialize
from zeroplan.runtime.models import GPT
from zeroplan.runtime.parallel.pipeline_schedules import (Action, interleaved, makespan, max_in_flight,
                                                          one_f_one_b, pipeline_actions, simulate)
from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, validate_config

SHAPES = [(2, 2, 2), (2, 2, 6), (4, 2, 8), (4, 3, 12), (3, 2, 9), (8, 4, 16), (4, 2, 4)]
"""(pp, v, m): m = pp (all warm-up), m a multiple of pp, odd pp."""


def _all(stages, chunks, m):
    return [interleaved(stage=s, stages=stages, micro_batches=m, chunks=chunks) for s in range(stages)]


def test_a_rank_runs_its_chunks_in_groups_of_pp_micro_batches():
    fwd = [(a.mb, a.chunk) for a in interleaved(stage=0, stages=2, micro_batches=4, chunks=2) if a.kind == "forward"]
    assert fwd == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    bwd = [(a.mb, a.chunk) for a in interleaved(stage=0, stages=2, micro_batches=4, chunks=2) if a.kind == "backward"]
    assert bwd == [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]


@pytest.mark.parametrize(("stages", "chunks", "m"), SHAPES)
def test_every_micro_batch_passes_every_model_stage_in_order(stages, chunks, m):
    """In the simulated global order, each micro-batch's forward goes through model stages
    0..pp v - 1, its backward back down, and the forward of a stage comes before its backward."""
    order = simulate(_all(stages, chunks, m))
    seen: dict[int, list[tuple[str, int]]] = {mb: [] for mb in range(m)}
    for rank, a in order:
        if a.kind in ("forward", "backward"):
            seen[a.mb].append((a.kind, a.chunk * stages + rank))
    last = stages * chunks - 1
    for mb, runs in seen.items():
        assert runs == [("forward", k) for k in range(last + 1)] + [("backward", k) for k in range(last, -1, -1)]


@pytest.mark.parametrize(("stages", "chunks", "m"), SHAPES)
def test_the_bubble_is_pp_minus_1_over_v_slots(stages, chunks, m):
    """Idle time (p - 1)(t_f + t_b) / v: the step's makespan over m (t_f + t_b) of work, chunks
    taking 1/v of a stage's forward (1) and backward (2); 1F1B's is (p - 1)(t_f + t_b)."""
    work = 3 * m
    mixed = makespan(_all(stages, chunks, m), forward=1 / chunks, backward=2 / chunks) - work
    plain = makespan([one_f_one_b(stage=s, stages=stages, micro_batches=m) for s in range(stages)],
                     forward=1, backward=2) - work
    assert mixed == pytest.approx((stages - 1) * 3 / chunks)
    assert plain == pytest.approx((stages - 1) * 3)


@pytest.mark.parametrize(("stages", "chunks", "m"), SHAPES)
def test_warm_up_holds_what_the_memory_model_counts(stages, chunks, m):
    plan = _compile(stages=stages, chunks=chunks, m=m, layers=stages * chunks)
    assert bubble_fraction(plan.parallel) == pytest.approx(
        (makespan(_all(stages, chunks, m), forward=1 / chunks, backward=2 / chunks) - 3 * m) / (3 * m))
    for s, actions in enumerate(_all(stages, chunks, m)):
        assert max_in_flight(actions) == in_flight(plan, s) * chunks


def test_bad_shapes_are_refused_and_a_wrong_chunk_is_found():
    with pytest.raises(ValueError, match=r"micro-batches\(6\) to be a multiple of the pipeline stages\(4\)"):
        pipeline_actions("interleaved", stage=0, stages=4, micro_batches=6, chunks=2)
    with pytest.raises(ValueError, match="at least 2 model chunks"):
        pipeline_actions("interleaved", stage=0, stages=2, micro_batches=2, chunks=1)
    wrong = _all(2, 2, 2)
    wrong[1] = [Action("recv_forward", 0, 1), *wrong[1][1:]]  # waits for chunk 1's input first
    with pytest.raises(RuntimeError, match="received micro-batch 0 of model stage 0"):
        simulate(wrong)


def _compile(*, stages: int, chunks: int, m: int, layers: int):
    spec = ModelSpec(name="interleave", layers=layers, hidden=32, heads=2, ffn=128, vocab=97, seq_len=8)
    config = validate_config({"train_batch_size": m, "train_micro_batch_size_per_gpu": 1,
                              "parallel": {"pp": stages, "pipeline": {"schedule": "interleaved",
                                                                       "virtual_stages": chunks}}})
    cluster = ClusterSpec.load("cpu").model_copy(update={"nproc_per_node": stages})
    return compile(config, spec, cluster)


def test_initialize_and_train_refuse_an_interleaved_plan(tmp_path):
    plan = _compile(stages=2, chunks=2, m=2, layers=4)
    with pytest.raises(ConfigError) as e:
        initialize(GPT(ModelSpec(name="interleave", layers=4, hidden=32, heads=2, ffn=128, vocab=97, seq_len=8)),
                   plan=plan)
    assert e.value.problems[0].path == "parallel.pipeline_schedule"
    path = tmp_path / "plan.json"
    plan.save(path)
    run = subprocess.run([sys.executable, "-m", "zeroplan", "train", str(path), "--steps", "1"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "parallel.pipeline_schedule" in run.stderr and "does not run it" in run.stderr
    assert "Traceback" not in run.stderr
