"""The memory model's arithmetic against hand-computed cases (ZeRO paper; Korthikanti et al. 2022;
for fp32, the buffers zeroplan's runtime allocates, measured by bench/memory_model.py)."""

from __future__ import annotations

import json

import pytest

from zeroplan.compiler import Calibration, estimate_memory
from zeroplan.compiler.memory import (comm_buffers, head_activation_bytes, layer_activation_bytes,
                                      loss_backward_bytes, model_states, stage_activations,
                                      training_phases)
from zeroplan.compiler.shapes import stage_shapes
from zeroplan.compiler.shards import IN_PLACE_MIN, pack_buckets, padded
from zeroplan.schemas import ConfigError, ModelSpec

P = 1_000_000  # divisible by every dp used below, so shards are exact


def per_param(states: dict[str, int]) -> float:
    return sum(states.values()) / P


@pytest.mark.parametrize("stage, dp, expected", [
    (0, 4, 2 + 4 + 12),           # 16-bit parameters; fp32 gradient buffer, master and moments
    (1, 4, 2 + 4 + 4 / 4 + 12 / 4),  # + the whole fp32 accumulation buffer; the rest sharded
    (2, 4, 2 + 16 / 4),           # the fp32 gradient shard
    (3, 4, 18 / 4),               # everything, the 16-bit partition beside the master
    (1, 8, 2 + 4 + 16 / 8),
    (2, 8, 2 + 16 / 8),
    (3, 8, 18 / 8),
])
def test_mixed_precision_adam_shards_as_the_zero_paper_with_fp32_gradients(stage, dp, expected):
    """The ZeRO paper's partitioning with gradient accumulation; the gradients are the runtime's
    fp32 buffers, not 16-bit."""
    states = model_states(params=P, dp=dp, stage=stage, param_dtype="bf16", accumulation=2)
    assert per_param(states) == expected


def test_model_state_categories_at_stage_0():
    states = model_states(params=P, dp=4, stage=0, param_dtype="fp16")
    assert states == {"parameters": 2 * P, "gradients": 4 * P, "optimizer_states": 8 * P, "master_weights": 4 * P}


def test_fp32_parameters_are_the_master_at_stage_0_as_the_runtime_does():
    """zero/stage0.py makes the fp32 parameters views of the master (as DDP's optimizer steps
    the parameters themselves); stages 1-2 keep a separate master shard."""
    states = model_states(params=P, dp=2, stage=0, param_dtype="fp32")
    assert states == {"parameters": 0, "gradients": 4 * P, "optimizer_states": 8 * P, "master_weights": 4 * P}
    assert model_states(params=P, dp=2, stage=1, param_dtype="fp32")["parameters"] == 4 * P


@pytest.mark.parametrize("stage, expected", [
    (0, 16.0),  # master (the parameters are its views), flat gradient, two moments
    (1, 16.0),  # + full fp32 accumulation buffer; master, gradient shard and moments over 2 ranks
    (2, 12.0),  # the gradient shard only
    (3, 8.0),  # the master shard is the parameters; gradient shard, two moments
])
def test_fp32_states_per_parameter_at_two_ranks(stage, expected):
    assert per_param(model_states(params=P, dp=2, stage=stage, param_dtype="fp32", accumulation=4)) == expected


def test_fp32_stage1_keeps_the_full_accumulation_buffer_and_the_shard_when_it_accumulates():
    states = model_states(params=P, dp=4, stage=1, param_dtype="fp32", accumulation=2)
    assert states["gradients"] == 4 * (P + P // 4) and states["master_weights"] == 4 * P // 4
    one = model_states(params=P, dp=4, stage=1, param_dtype="fp32", accumulation=1)
    assert one == model_states(params=P, dp=4, stage=2, param_dtype="fp32"), "one micro-batch: stage 2's states"


def test_sgd_without_momentum_keeps_no_state():
    states = model_states(params=P, dp=1, stage=0, param_dtype="bf16", optimizer="SGD", momentum=0.0)
    assert states["optimizer_states"] == 0 and per_param(states) == 2 + 4 + 4


def test_stage3_keeps_persistent_parameters_whole():
    states = model_states(params=P, dp=4, stage=3, param_dtype="bf16", persistent=1000)
    assert states["parameters"] == 2 * (1000 + P // 4)
    assert model_states(params=P, dp=4, stage=3, param_dtype="fp32", persistent=1000)["parameters"] == 4 * 1000


S, B, H, A = 128, 2, 64, 4  # 5as/h = 40 and 2as/h = 16: integral


def test_activations_match_korthikanti_with_dropout_in_16bit():
    got = layer_activation_bytes(seq=S, micro=B, hidden=H, heads=A, ffn=4 * H, element_bytes=2, dropout=True)
    assert got == S * B * H * (34 + 5 * A * S // H)


def test_activations_with_tensor_parallelism_match_equation_2():
    t = 2
    got = layer_activation_bytes(seq=S, micro=B, hidden=H, heads=A, ffn=4 * H, tp=t, element_bytes=2, dropout=True)
    assert got == S * B * H * 10 + S * B * H * 24 // t + 5 * A * S * S * B // t


def test_activations_without_dropout_keep_no_masks():
    assert layer_activation_bytes(seq=S, micro=B, hidden=H, heads=A, ffn=4 * H, element_bytes=2) \
        == S * B * H * (32 + 2 * A * S // H)
    assert layer_activation_bytes(seq=S, micro=B, hidden=H, heads=A, ffn=4 * H, element_bytes=4) \
        == S * B * H * (64 + 4 * A * S // H)


def test_head_keeps_the_fp32_log_softmax_not_the_logits():
    for e in (2, 4):
        got = head_activation_bytes(seq=S, micro=B, hidden=H, vocab=1000, tp=1, element_bytes=e)
        assert got == 2 * e * S * B * H + 4 * S * B * 1000


def _buffers(plan, model):
    return comm_buffers(plan, stage_shapes(model, tp=1, pp=1)[0], model=model)


def test_reduction_buffers_are_the_bucket_and_its_output_on_every_device(tiny, compile_dict):
    """Stage 1 on 2 ranks, one bucket holding the whole model: the bucket and its 1/2-size
    output, on cpu as on a GPU (gloo's reduce-scatter and all-gather run per rank, in place:
    runtime/comm.py); the publishing all-gather's output is smaller."""
    data = {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 1, "reduce_bucket_size": 10**9, "allgather_bucket_size": 10**9}}
    cpu = compile_dict(data, nproc_per_node=2)
    gpu = compile_dict(data, cluster="h100-80", nproc_per_node=2)
    n = tiny.total_params
    assert _buffers(cpu, tiny).reduction == _buffers(gpu, tiny).reduction == int(4 * n * (1 + 1 / 2))
    assert _buffers(cpu, tiny).publish == _buffers(gpu, tiny).publish == 4 * n < _buffers(cpu, tiny).reduction


def test_parameters_gathered_into_their_own_storage_need_no_publish_buffer(compile_dict):
    """The small preset on cpu (gloo): its embedding matrix (IN_PLACE_MIN elements or more) is
    published into its own storage, so the publish buffer is the largest run of the rest."""
    spec = ModelSpec.load("small")
    shape = stage_shapes(spec, tp=1, pp=1)[0]
    data = {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 2, "allgather_bucket_size": shape.params}}
    cpu = compile_dict(data, model="small", nproc_per_node=2)
    gpu = compile_dict(data, model="small", cluster="h100-80", nproc_per_node=2)
    largest = max(shape.tensors)
    assert largest >= IN_PLACE_MIN and [n >= IN_PLACE_MIN for n in shape.tensors].count(True) == 1
    before = sum(shape.tensors[:shape.tensors.index(largest)])
    after = shape.params - before - largest
    assert _buffers(gpu, spec).publish == 4 * shape.params
    assert _buffers(cpu, spec).publish == 4 * max(before, after)


def test_publish_buffers_are_every_bucket_with_overlap_else_the_largest(tiny, compile_dict):
    """Stage 2 on a GPU, all-gather buckets of about a quarter of the model: one buffer at a
    time without overlap_comm (the largest bucket's), every bucket's at once with it."""
    shape = stage_shapes(tiny, tp=1, pp=1)[0]
    quarter = shape.params // 4
    sizes = {}
    for overlap in (False, True):
        data = {"train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 2, "allgather_bucket_size": quarter, "overlap_comm": overlap}}
        plan = compile_dict(data, cluster="h100-80", nproc_per_node=2)
        buckets = pack_buckets(shape.tensors, world=2, max_elements=quarter, reverse=False)
        sizes[overlap] = [padded(shape.tensors[s:e], world=2) for s, e in buckets]
        assert len(buckets) > 2
        assert _buffers(plan, tiny).publish == 4 * (sum if overlap else max)(sizes[overlap])


def test_stage_0_reduces_its_fp32_gradient_buffer_without_a_bucket(tiny, compile_dict):
    """Stage 0's flat fp32 gradient buffer is its buckets (compiler.shards.reduces_in_place);
    reducing in bf16 needs a bucket of its own again."""
    data = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    assert _buffers(compile_dict(data, nproc_per_node=2), tiny).reduction == 0
    bf16 = {**data, "bf16": {"enabled": True}, "communication_data_type": "bf16"}
    assert _buffers(compile_dict(bf16, nproc_per_node=2), tiny).reduction > 0


def test_the_peak_is_the_largest_phase_and_its_categories_sum_to_it(tiny, compile_dict):
    """One micro-batch of the tiny model: the gradient reduction (one bucket for the whole
    model, launched after backward has freed every activation, two in flight with
    overlap_comm) is the peak; eight: the start of backward. Either way the categories are
    what is live then."""
    small, large = ({"train_micro_batch_size_per_gpu": m,
                     "zero_optimization": {"stage": 2, "reduce_bucket_size": 10**9, "overlap_comm": True}}
                    for m in (1, 8))
    at_reduction = compile_dict(small, nproc_per_node=2).estimates.memory_per_rank
    at_backward = compile_dict(large, nproc_per_node=2).estimates.memory_per_rank
    assert at_reduction["activations"] == 0
    assert at_reduction["comm_buffers"] == _buffers(compile_dict(small, nproc_per_node=2), tiny).reduction
    assert at_backward["comm_buffers"] == 0 and at_backward["activations"] > at_reduction["comm_buffers"]


def test_buckets_launched_during_backward_meet_the_activations_left(tiny, compile_dict):
    """A bucket of half the model launches half-way through backward, beside half the activations."""
    n = tiny.total_params
    data = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": n // 2}}
    plan = compile_dict(data, nproc_per_node=2)
    buffers = _buffers(plan, tiny)
    assert buffers.overlap == pytest.approx(1 - (n // 2) / n)
    phases = training_phases(activations=2000, after_loss=1000, buffers=buffers, setup_parameters=0)
    assert phases["reduction"] == {"activations": int(1000 * buffers.overlap), "comm_buffers": buffers.reduction}


def test_stage3_set_up_holds_the_whole_model(tiny, compile_dict):
    """Every rank builds the whole model before stage 3 shards it: with little to train, that
    moment is the peak and the parameters count the whole model."""
    short = ModelSpec.model_validate({**tiny.model_dump(), "name": "tiny-short", "seq_len": 8})
    data = {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0,
                                  "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 100_000}}
    memory = estimate_memory(compile_dict(data, nproc_per_node=2), short).device
    assert memory["parameters"] == 4 * short.total_params and memory["activations"] == memory["comm_buffers"] == 0


def test_flash_attention_drops_the_quadratic_term():
    got = layer_activation_bytes(seq=S, micro=B, hidden=H, heads=A, ffn=4 * H, element_bytes=2, flash=True)
    assert got == S * B * H * 32 + 4 * A * S * B


def test_plan_activations_with_and_without_checkpointing(tiny, compile_dict):
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    off = compile_dict(base, nproc_per_node=1)
    on = compile_dict({**base, "activation_checkpointing": {"enabled": True}}, nproc_per_node=1)
    s, b, h = tiny.seq_len, 2, tiny.hidden
    layer = layer_activation_bytes(seq=s, micro=b, hidden=h, heads=tiny.heads, ffn=tiny.ffn, element_bytes=4,
                                   flash=True)
    head = (head_activation_bytes(seq=s, micro=b, hidden=h, vocab=tiny.vocab, tp=1, element_bytes=4)
            + loss_backward_bytes(seq=s, micro=b, vocab=tiny.vocab, tp=1))
    assert loss_backward_bytes(seq=s, micro=b, vocab=tiny.vocab, tp=1) == 2 * 4 * s * b * tiny.vocab
    assert off.estimates.memory_per_rank["activations"] == tiny.layers * layer + head
    # the head's backward (and its loss's temporaries) is over before the first block is recomputed
    assert on.estimates.memory_per_rank["activations"] == tiny.layers * 4 * s * b * h + max(layer, head)


def test_1f1b_first_stage_holds_pp_micro_batches(tiny, compile_dict):
    data = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8, "parallel": {"pp": 2}}
    plan = compile_dict(data, nproc_per_node=2)
    layer = layer_activation_bytes(seq=tiny.seq_len, micro=1, hidden=tiny.hidden, heads=tiny.heads, ffn=tiny.ffn,
                                   element_bytes=4, flash=True)
    head = head_activation_bytes(seq=tiny.seq_len, micro=1, hidden=tiny.hidden, vocab=tiny.vocab, tp=1,
                                 element_bytes=4) + loss_backward_bytes(seq=tiny.seq_len, micro=1, vocab=tiny.vocab, tp=1)
    first, last = 2 * (tiny.layers // 2) * layer, (tiny.layers // 2) * layer + head
    shapes = stage_shapes(tiny, tp=1, pp=2)
    assert [stage_activations(plan, tiny, shape)[0] for shape in shapes] == [first, last]


def test_cpu_offload_moves_optimizer_state_to_the_host(tiny, compile_dict):
    data = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    plan = compile_dict(data, nproc_per_node=2)
    device, host = plan.estimates.memory_per_rank, plan.estimates.host_memory_per_rank
    shard = -(-tiny.total_params // 2)
    assert device["optimizer_states"] == 0 and device["master_weights"] == 0
    assert host["optimizer_states"] == 8 * shard and host["master_weights"] == 4 * shard
    assert plan.estimates.host_bytes_per_node == 2 * sum(host.values())
    assert plan.kernels.optimizer == "cpu_adam"


def test_stage3_param_offload_to_nvme_leaves_only_persistent_params(tiny, tmp_path, compile_dict):
    data = {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)},
                                  "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    plan = compile_dict(data, nproc_per_node=2)
    assert plan.estimates.memory_per_rank["parameters"] == 0
    shard = -(-tiny.total_params // 2)
    # fp32: the parameters are the masters, so 4 B of parameters + 8 B of Adam moments per element
    assert plan.estimates.nvme_bytes_per_node == 2 * (shard * 4 + shard * 8)


def test_calibration_scales_and_offsets_categories(tmp_path, compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1}, nproc_per_node=1)
    from zeroplan.schemas import ModelSpec
    model = ModelSpec.load("tiny")
    raw = estimate_memory(plan, model)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"source": "run-1", "device": {"activations": {"scale": 1.5},
                                                              "overhead": {"offset_bytes": -1000}}}))
    fixed = estimate_memory(plan, model, calibration=Calibration.load(path))
    assert fixed.device["activations"] == round(raw.device["activations"] * 1.5)
    assert fixed.device["overhead"] == raw.device["overhead"] - 1000
    assert fixed.device["parameters"] == raw.device["parameters"]
    assert fixed.notes == ("calibrated from run-1",)


def test_calibration_refuses_unknown_categories(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"device": {"activation": {"scale": 2}}}))
    with pytest.raises(ConfigError) as e:
        Calibration.load(path)
    assert e.value.problems[0].path == "device.activation" and e.value.source == str(path)
