"""The interleaved 1F1B schedule in the compiler: its checks at compile, its bubble and point-to-point
sends in the cost model, its activations in the memory model (Narayanan et al. 2021, section 2.2.2)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from zeroplan.compiler.comm import stage_collectives
from zeroplan.compiler.cost import bubble_fraction, step_time
from zeroplan.compiler.memory import in_flight
from zeroplan.compiler.shapes import stage_shapes
from zeroplan.schemas import CLUSTER_PRESETS, ConfigError

ACCUM = 4  # micro-batches per step: a multiple of pp 2


def _plan(compile_dict, *, schedule="interleaved", chunks=3, accum=ACCUM, pp=2):
    pipeline = {"schedule": schedule, **({"virtual_stages": chunks} if chunks is not None else {})}
    return compile_dict({"train_batch_size": accum, "train_micro_batch_size_per_gpu": 1,
                         "parallel": {"pp": pp, "pipeline": pipeline}}, nproc_per_node=pp)


def test_the_plan_carries_the_schedule_and_its_chunks(compile_dict):
    p = _plan(compile_dict).parallel  # tiny: 6 layers = pp 2 x 3 chunks of 1
    assert (p.pipeline_schedule, p.pipeline_virtual_stages, p.pipeline_micro_batches) == ("interleaved", 3, ACCUM)
    assert _plan(compile_dict, schedule="1f1b", chunks=None).parallel.pipeline_virtual_stages == 1


@pytest.mark.parametrize(("kwargs", "key", "words"), [
    (dict(accum=3), "gradient_accumulation_steps", "3 micro-batches is not a multiple of pp(2)"),
    (dict(chunks=2), "parallel.pipeline.virtual_stages", "layers(6) do not split into pp(2) * virtual_stages(2)"),
    (dict(chunks=None), "parallel.pipeline.virtual_stages", "at least 2 model chunks"),
    (dict(schedule="1f1b", chunks=3), "parallel.pipeline.virtual_stages", "needs schedule 'interleaved'"),
    (dict(pp=1), "parallel.pipeline.schedule", "needs a pipeline: pp is 1"),
])
def test_what_the_schedule_cannot_run_is_refused_naming_the_key(compile_dict, kwargs, key, words):
    with pytest.raises(ConfigError) as e:
        _plan(compile_dict, **kwargs)
    problem = next(p for p in e.value.problems if p.path == key)
    assert words in problem.message


def test_the_bubble_is_one_over_v_of_1f1b(compile_dict, tiny):
    cluster = CLUSTER_PRESETS["cpu"]
    plain, mixed = _plan(compile_dict, schedule="1f1b", chunks=None), _plan(compile_dict)
    assert bubble_fraction(plain.parallel) == pytest.approx((2 - 1) / ACCUM)
    assert bubble_fraction(mixed.parallel) == pytest.approx((2 - 1) / (3 * ACCUM))
    a, b = step_time(plain, tiny, cluster), step_time(mixed, tiny, cluster)
    assert a["compute"] == pytest.approx(b["compute"])
    assert b["pipeline_bubble"] == pytest.approx(a["pipeline_bubble"] / 3)
    assert b["pipeline_bubble"] == pytest.approx(b["compute"] / (3 * ACCUM))


def test_each_chunk_sends_its_own_activations(compile_dict, tiny):
    plain, mixed = _plan(compile_dict, schedule="1f1b", chunks=None), _plan(compile_dict)
    shapes = stage_shapes(tiny, tp=1, pp=2, method=plain.parallel.pipeline_partition_method)

    def sends(plan, stage):
        return {c.phase: c.calls for c in stage_collectives(plan, tiny, shapes[stage])
                if c.op == "send_recv"}

    # 1F1B: stage 0 sends forward only, stage 1 backward only (a header and an activation forward)
    assert sends(plain, 0) == {"forward": 2 * ACCUM, "backward": 0}
    assert sends(plain, 1) == {"forward": 0, "backward": ACCUM}
    # interleaved over 3 chunks: every chunk but the model's last sends forward, but its first backward
    assert sends(mixed, 0) == {"forward": 2 * 3 * ACCUM, "backward": 2 * ACCUM}
    assert sends(mixed, 1) == {"forward": 2 * 2 * ACCUM, "backward": 3 * ACCUM}


def test_activations_held_follow_the_warm_up(compile_dict):
    """Rank r holds 2 (pp - r - 1) + (v - 1) pp + 1 chunk-micro-batches, each 1/v of its layers."""
    plan = _plan(compile_dict, accum=8)  # pp 2, v 3: 7 and 5 chunk-micro-batches
    assert [in_flight(plan, s) for s in range(2)] == [Fraction(7, 3), Fraction(5, 3)]
    every = _plan(compile_dict, accum=2)  # m = pp: every chunk of every micro-batch before a backward
    assert in_flight(every, 0) == in_flight(every, 1) == 2
