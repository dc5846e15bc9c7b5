""""auto" as Hugging Face writes it, compiled without a Trainer; the optimizer types' plans;
`sub_group_size: 0`."""

from __future__ import annotations

import pytest

from zeroplan.compiler.shapes import stage_shapes
from zeroplan.schemas import ConfigError, ModelSpec

HF = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
      "gradient_clipping": "auto", "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
      "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
      "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                    "warmup_num_steps": 10}},
      "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                            "stage3_param_persistence_threshold": "auto",
                            "stage3_gather_16bit_weights_on_model_save": "auto"}}


def test_hugging_face_autos_compile_without_resolve_auto_and_are_recorded(compile_dict):
    plan = compile_dict(HF, model="7b", cluster="h100-80")
    h = 4096
    assert (plan.zero.reduce_bucket_size, plan.zero.prefetch_bucket_size,
            plan.zero.param_persistence_threshold) == (h * h, int(0.9 * h * h), 10 * h)
    assert plan.batch.gradient_accumulation_steps == 1 and plan.batch.global_batch_size == 2 * plan.parallel.dp
    o = plan.optimizer
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.gradient_clipping) == (2e-5, (0.9, 0.999), 1e-8, 0.0, 1.0)
    assert plan.scheduler.params["warmup_max_lr"] == 2e-5 and plan.scheduler.params["warmup_min_lr"] == 0.0
    assert plan.deepspeed.stage3_gather_16bit_weights_on_model_save is False
    decided = plan.provenance.resolved_auto
    assert set(decided) == {"train_batch_size", "gradient_accumulation_steps", "gradient_clipping", "fp16.enabled",
                            "bf16.enabled", "optimizer.params.betas", "optimizer.params.eps",
                            "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr",
                            "scheduler.params.warmup_max_lr", "zero_optimization.reduce_bucket_size",
                            "zero_optimization.stage3_prefetch_bucket_size",
                            "zero_optimization.stage3_param_persistence_threshold",
                            "zero_optimization.stage3_gather_16bit_weights_on_model_save"}
    assert decided["gradient_clipping"] == "1.0: TrainingArguments' max_grad_norm default"


def test_what_only_the_trainer_knows_is_one_problem_per_key(compile_dict):
    data = {**HF, "train_micro_batch_size_per_gpu": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                               "total_num_steps": "auto"}}}
    with pytest.raises(ConfigError) as e:
        compile_dict(data, model="7b", cluster="h100-80")
    problems = {p.path: p for p in e.value.problems}
    assert sorted(problems) == ["optimizer.params.lr", "scheduler.params.total_num_steps",
                                "scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps",
                                "train_micro_batch_size_per_gpu"]
    assert "learning_rate" in problems["optimizer.params.lr"].message
    assert "warmup_steps or warmup_ratio" in problems["scheduler.params.warmup_num_steps"].message
    assert "autotune" not in problems["optimizer.params.lr"].render()
    assert "per_device_train_batch_size" in problems["train_micro_batch_size_per_gpu"].message


def test_the_micro_batch_is_searched_with_resolve_auto(compile_dict):
    plan = compile_dict({**HF, "train_micro_batch_size_per_gpu": "auto"}, model="7b", cluster="h100-80",
                        resolve_auto=True)
    assert plan.provenance.resolved_auto["train_micro_batch_size_per_gpu"].startswith(
        f"{plan.batch.micro_batch_size}: fastest of")


def test_sub_group_size_zero_tiles_by_the_largest_parameter_partition(compile_dict):
    data = {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "sub_group_size": 0, "offload_optimizer": {"device": "cpu"}}}
    plan = compile_dict(data, model="7b", cluster="h100-80")
    largest = max(stage_shapes(ModelSpec.load("7b"), tp=1, pp=1)[0].tensors)
    assert largest == 32000 * 4096
    assert plan.zero.sub_group_size == -(-largest // plan.parallel.dp)


@pytest.mark.parametrize("kind, lr, eps, betas, decoupled", [
    ("Lamb", 1e-3, 1e-8, (0.9, 0.999), False), ("Lion", 1e-3, 1e-8, (0.9, 0.999), True),
    ("Adagrad", 1e-2, 1e-10, (0.9, 0.999), False), ("SGD", 1e-3, 1e-8, (0.9, 0.999), False)])
def test_each_optimizer_type_gets_deepspeeds_defaults(compile_dict, kind, lr, eps, betas, decoupled):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": kind}}, nproc_per_node=2)
    o = plan.optimizer
    assert (o.type, o.lr, o.eps, o.betas, o.decoupled_weight_decay) == (kind, lr, eps, betas, decoupled)
    assert plan.kernels.optimizer == "torch_foreach"


def test_lamb_options_reach_the_plan(compile_dict):
    params = {"lr": 2e-3, "bias_correction": False, "max_coeff": 3.0, "min_coeff": 0.2, "eps_inside_sqrt": True}
    o = compile_dict({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Lamb", "params": params}},
                     nproc_per_node=2).optimizer
    assert (o.lr, o.bias_correction, o.max_coeff, o.min_coeff, o.eps_inside_sqrt) == (2e-3, False, 3.0, 0.2, True)


@pytest.mark.parametrize("extra, path", [
    ({"parallel": {"tp": 2}}, "optimizer.type"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}},
     "zero_optimization.offload_optimizer.device")])
def test_lamb_is_refused_where_its_trust_ratio_would_see_part_of_a_tensor(compile_dict, extra, path):
    with pytest.raises(ConfigError) as e:
        compile_dict({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Lamb"}, **extra}, nproc_per_node=2)
    assert path in [p.path for p in e.value.problems]


@pytest.mark.parametrize("cluster, offload, correction, kernel", [
    ("cpu", "none", True, "torch_fused"), ("cpu", "none", False, "torch_foreach"),
    ("cpu", "cpu", False, "cpu_adam"), ("h100-80", "none", False, "cuda_fused")])
def test_adam_without_bias_correction_gets_a_kernel_that_has_the_switch(compile_dict, cluster, offload, correction,
                                                                         kernel):
    data = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"bias_correction": correction}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": offload}}}
    plan = compile_dict(data, cluster=cluster, nproc_per_node=2)
    assert (plan.kernels.optimizer, plan.optimizer.bias_correction) == (kernel, correction)


@pytest.mark.parametrize("given, auto, cluster", [("bf16", "fp16", "h100-80"), ("fp16", "bf16", "h100-80"),
                                                  ("bf16", "fp16", "cpu")])
def test_an_auto_precision_flag_follows_the_other_one_when_it_is_on(compile_dict, given, auto, cluster):
    data = {"train_micro_batch_size_per_gpu": 1, given: {"enabled": True}, auto: {"enabled": "auto"}}
    plan = compile_dict(data, cluster=cluster, nproc_per_node=2)
    assert plan.precision.param_dtype == given
    assert plan.provenance.resolved_auto[f"{auto}.enabled"] == f"false: {given}.enabled is true"
