"""Pipeline parallelism without processes: the schedules as data, the partition methods, the
GPT as a layer sequence, the plan's pipeline fields and the refusals (ZeRO-3 with pp, pp > layers)."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zeroplan.compiler import compile
from zeroplan.compiler.shapes import PIPELINE_LAYER_CLASSES, stage_shapes
from zeroplan.runtime import initialize
from zeroplan.runtime.models import GPT
from zeroplan.runtime.parallel import PipelineModule
from zeroplan.runtime.parallel.pipeline import model_layers, partition, split_model
from zeroplan.runtime.parallel.pipeline_schedules import Action, gpipe, max_in_flight, one_f_one_b, pipeline_actions, simulate
from zeroplan.schemas import ClusterSpec, ConfigError, ConfigWarning, ModelSpec, validate_config

from rt_pipeline import pipe_plan

SPEC = ModelSpec(name="pp-test", layers=4, hidden=32, heads=2, ffn=128, vocab=97, seq_len=8)


def _names(actions):
    return [repr(a) for a in actions]


# -- schedules ---------------------------------------------------------------------------------
def test_gpipe_runs_every_forward_then_every_backward():
    assert _names(gpipe(stage=0, stages=2, micro_batches=2)) == [
        "forward(0)", "send_forward(0)", "forward(1)", "send_forward(1)",
        "recv_backward(0)", "backward(0)", "recv_backward(1)", "backward(1)"]
    assert _names(gpipe(stage=1, stages=2, micro_batches=2)) == [
        "recv_forward(0)", "forward(0)", "recv_forward(1)", "forward(1)",
        "backward(0)", "send_backward(0)", "backward(1)", "send_backward(1)"]


def test_1f1b_warms_up_then_alternates_then_drains():
    kinds = [(a.kind, a.mb) for a in one_f_one_b(stage=0, stages=3, micro_batches=4) if a.kind in ("forward", "backward")]
    assert kinds == [("forward", 0), ("forward", 1), ("forward", 2), ("backward", 0), ("forward", 3),
                     ("backward", 1), ("backward", 2), ("backward", 3)]
    last = [(a.kind, a.mb) for a in one_f_one_b(stage=2, stages=3, micro_batches=4) if a.kind in ("forward", "backward")]
    assert last == [("forward", 0), ("backward", 0), ("forward", 1), ("backward", 1), ("forward", 2),
                    ("backward", 2), ("forward", 3), ("backward", 3)]


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16])
def test_in_flight_bounds_and_no_deadlock(stages, m):
    for name in ("1f1b", "gpipe"):
        per_stage = [pipeline_actions(name, stage=s, stages=stages, micro_batches=m) for s in range(stages)]
        for s, actions in enumerate(per_stage):
            assert max_in_flight(actions) == (m if name == "gpipe" else min(stages - s, m))
            fwd = [a.mb for a in actions if a.kind == "forward"]
            bwd = [a.mb for a in actions if a.kind == "backward"]
            assert fwd == list(range(m)) and bwd == list(range(m))
        order = simulate(per_stage)
        assert len(order) == sum(len(a) for a in per_stage)


def test_simulate_finds_a_deadlock_and_a_mismatched_receive():
    wrong_order = [[Action("forward", 0), Action("recv_backward", 0), Action("backward", 0),
                    Action("send_forward", 0)],
                   [Action("recv_forward", 0), Action("forward", 0), Action("backward", 0),
                    Action("send_backward", 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(wrong_order)
    swapped = [gpipe(stage=0, stages=2, micro_batches=2),
               [Action("recv_forward", 1), Action("forward", 1)]]
    with pytest.raises(RuntimeError, match="received micro-batch 0"):
        simulate(swapped)


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="none of"):
        pipeline_actions("zigzag", stage=0, stages=2, micro_batches=2)
    with pytest.raises(ValueError, match="outside a pipeline"):
        pipeline_actions("1f1b", stage=2, stages=2, micro_batches=2)


# -- partitioning ------------------------------------------------------------------------------
def test_gpt_partition_methods():
    layers = GPT(SPEC).pipeline_layers()  # embeddings, 4 blocks, head
    assert [type(m).__name__ for m in layers] == ["Embeddings", "Block", "Block", "Block", "Block", "Head"]
    assert partition(layers, stages=4, method="uniform") == [0, 2, 4, 5, 6]
    assert partition(layers, stages=4, method="type:block") == [0, 2, 3, 4, 6]
    # parameters: the embeddings (97*32 + 8*32) and the head (97*32 tied + 64) weigh less than a block
    assert partition(layers, stages=3, method="parameters") == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="matches no layer class"):
        partition(layers, stages=2, method="type:conv")
    with pytest.raises(ValueError, match="none of parameters, uniform, type:<regex>"):
        partition(layers, stages=2, method="balanced")
    with pytest.raises(ConfigError, match=r"pp\(7\) > layers\(6\)"):
        partition(layers, stages=7, method="uniform")


PARTITION_SPECS = [SPEC, ModelSpec.load("tiny"),
                   ModelSpec(name="wide-vocab", layers=6, hidden=32, heads=2, ffn=128, vocab=2000, seq_len=8),
                   ModelSpec(name="untied", layers=5, hidden=32, heads=2, ffn=128, vocab=500, seq_len=8,
                             tied_embeddings=False)]


@pytest.mark.parametrize("method", ["parameters", "uniform", "type:block", "type:Block|Head"])
@pytest.mark.parametrize("spec", PARTITION_SPECS, ids=[s.name for s in PARTITION_SPECS])
def test_runtime_partition_is_the_compilers(spec, method):
    """Each stage the runtime cuts from the built-in GPT runs the layers the compiler's stage
    shape says and holds its parameter tensors, in order (the memory and comm models' input)."""
    model = GPT(spec)
    assert tuple(type(m).__name__ for m in model.pipeline_layers()) == (
        PIPELINE_LAYER_CLASSES[0], *[PIPELINE_LAYER_CLASSES[1]] * spec.layers, PIPELINE_LAYER_CLASSES[2])
    for pp in range(2, min(spec.layers, 4) + 1):
        for shape in stage_shapes(spec, tp=1, pp=pp, method=method):
            stage, _ = split_model(model, stage=shape.index, stages=pp, method=method)
            layers = [int(k) for k in stage.layers]
            assert (layers[0], layers[-1] + 1) == shape.layer_range, f"pp {pp}, stage {shape.index}"
            assert [p.numel() for p in stage.parameters() if p.requires_grad] == list(shape.tensors)


def test_gpt_layers_reproduce_its_forward():
    torch.manual_seed(0)
    model = GPT(SPEC)
    ids, labels = torch.randint(0, SPEC.vocab, (3, 8)), torch.randint(0, SPEC.vocab, (3, 8))
    x = ids
    for layer in model.pipeline_layers():
        x = layer(x)
    assert torch.equal(model.pipeline_loss()(x, labels), model(ids, labels))


def test_stages_cover_the_plain_state_dict_and_share_the_tied_embedding():
    model = GPT(SPEC)
    plain = model.state_dict()
    names, tied = [], []
    for s in range(3):
        stage, _ = split_model(model, stage=s, stages=3, method="parameters")
        names += [stage.plain_names[k] for k in stage.state_dict()]
        tied += [(s, t.stages) for t in stage.tied]
    assert sorted(names) == sorted(plain), "the stages' tensors are not exactly the plain model's"
    assert tied == [(0, (0, 2)), (2, (0, 2))]
    first, _ = split_model(model, stage=0, stages=3, method="parameters")
    assert first.get_parameter(first.tied[0].local_name) is model.wte.weight


def test_a_stage_keeps_only_its_layers():
    """Neither the stage nor its loss may hold the whole model: the other stages' layers are freed."""
    model = GPT(SPEC)
    later_block = weakref.ref(model.blocks[3])
    stage, loss_fn = split_model(model, stage=0, stages=2, method="uniform")  # embeddings, blocks 0-1
    del model
    gc.collect()
    assert later_block() is None, "a block of another stage is still referenced"
    assert loss_fn is not None and len(stage.layers) == 3


def test_pipeline_module_wraps_a_sequential():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = PipelineModule(layers=seq, loss_fn=F.mse_loss)
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    assert torch.equal(model(x, y), F.mse_loss(seq(x), y))
    stage, loss_fn = split_model(model, stage=1, stages=2, method="type:linear")
    assert loss_fn is F.mse_loss
    assert list(stage.plain_names.values()) == ["layers.2.weight", "layers.2.bias"]
    with pytest.raises(ConfigError, match=r"PipelineModule\(layers=\.\.\., loss_fn=\.\.\.\)"):
        model_layers(seq)


# -- plan and refusals -------------------------------------------------------------------------
def _compile(data: dict, nproc: int = 2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        config = validate_config({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 1, **data})
    return compile(config, ModelSpec.load("tiny"), ClusterSpec.load("cpu").model_copy(update={"nproc_per_node": nproc}))


def test_plan_carries_schedule_and_partition_method():
    plan = _compile({"parallel": {"pp": 2, "pipeline": {"schedule": "gpipe", "partition_method": "type:Block"}}})
    p = plan.parallel
    assert (p.pp, p.dp, p.pipeline_schedule, p.pipeline_partition_method) == (2, 1, "gpipe", "type:Block")
    assert p.pipeline_micro_batches == plan.batch.gradient_accumulation_steps == 8
    assert _compile({"parallel": {"pp": 2}}).parallel.pipeline_partition_method == "parameters"


def test_bad_partition_method_names_the_key():
    with pytest.raises(ConfigError) as e:
        _compile({"parallel": {"pp": 2, "pipeline": {"partition_method": "type:["}}})
    assert "parallel.pipeline.partition_method" in str(e.value) and "bad regex" in str(e.value)


def test_zero3_with_pp_is_refused_at_compile_and_by_the_runtime():
    with pytest.raises(ConfigError) as e:
        _compile({"parallel": {"pp": 2}, "zero_optimization": {"stage": 3}})
    problem = next(p for p in e.value.problems if p.path == "zero_optimization.stage")
    assert "ZeRO stage 3 with pp(2) > 1 is not supported" in problem.message
    assert "set zero_optimization.stage to 0, 1 or 2, or parallel.pp to 1" in problem.suggestion
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 with pp\(2\)"):
        initialize(GPT(SPEC), plan=pipe_plan(stage=3, dp=1, pp=2, accum=2))


def test_pp_above_layers_is_refused_at_compile():
    with pytest.raises(ConfigError, match=r"pp\(8\) > layers\(6\) of model tiny"):
        _compile({"parallel": {"pp": 8}}, nproc=8)
