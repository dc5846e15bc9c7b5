"""transformers.Trainer through zeroplan (ZeroplanTrainer) trains as the same Trainer unsharded.

GPT-2 and Llama (small configs, random weights, nothing downloaded) on 2 ranks: plain
`transformers.Trainer` (DDP, nothing sharded) is the reference; ZeroplanTrainer runs axolotl's
real zero2.json (ZeRO-2, optimizer state offloaded to the CPU) and zero3.json (ZeRO-3), whose
batch sizes, accumulation and clipping are "auto", filled from the TrainingArguments. The
Trainer's own AdamW (its decay / no-decay groups), linear warmup schedule, clipping at
max_grad_norm 0.5 and shorter last accumulation window all hold: every logged loss, grad norm,
learning rate and epoch-end evaluation loss equals the reference's (losses and norms to 1e-5 relative: two reductions
of the same gradients in another order), the trained weights match by rt_tolerance's bound,
and the model `save_model` wrote reloads with `from_pretrained` to exactly the engine's fp32
weights. A Trainer checkpoint (the engine's sharded checkpoint beside the model) resumes to the
uninterrupted run. transformers' own ds_config_zero2.json (optimizer and WarmupLR blocks, all
"auto") compiles to TrainingArguments' values. One spawn of 2 processes runs every case.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from rt_any_model import hf_model  # noqa: E402
from rt_spawn import job_result, spawn_jobs  # noqa: E402
from rt_tolerance import compare  # noqa: E402
from rt_trainer_jobs import ARGS  # noqa: E402

pytestmark = pytest.mark.numerics

MODELS = ("gpt2", "llama")
CONFIGS = {2: "real_axolotl_zero2.json", 3: "real_axolotl_zero3.json"}
CASES = [(m, s) for m in MODELS for s in CONFIGS]
STEPS = 6  # 2 epochs of windows 2, 2, 1


@functools.lru_cache(maxsize=None)
def _spawned(root: str) -> dict:
    jobs = [(f"plain-{m}", "rt_trainer_jobs:plain", {"model": m, "out": f"{root}/plain-{m}"}) for m in MODELS]
    jobs += [(f"{m}-z{s}", "rt_trainer_jobs:sharded",
              {"model": m, "config": CONFIGS[s], "out": f"{root}/{m}-z{s}",
               **({"save_steps": 3} if (m, s) == ("llama", 3) else {})}) for m, s in CASES]
    jobs += [("resumed", "rt_trainer_jobs:sharded",
              {"model": "llama", "config": CONFIGS[3], "out": f"{root}/resumed", "save": False,
               "resume": f"{root}/llama-z3/checkpoint-3"}),
             ("blocks", "rt_trainer_jobs:sharded",
              {"model": "gpt2", "config": "real_transformers_ds_config_zero2.json", "out": f"{root}/blocks",
               "save": False}),
             ("refused", "rt_trainer_jobs:refusals", {"out": f"{root}/refused"})]
    return spawn_jobs(2, jobs)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict:
    return _spawned(str(tmp_path_factory.mktemp("trainer")))


@pytest.mark.parametrize("model,stage", CASES, ids=[f"{m}-z{s}" for m, s in CASES])
def test_trainer_through_zeroplan_matches_the_unsharded_trainer(spawned, model, stage, one_thread):
    got, want = job_result(spawned, f"{model}-z{stage}"), job_result(spawned, f"plain-{model}")
    assert got["plan"].zero.stage == stage and got["plan"].parallel.dp == 2
    assert got["steps"] == want["steps"] == STEPS
    assert got["lrs"] == pytest.approx(want["lrs"], rel=1e-12), "Trainer's warmup schedule, stepped by the engine"
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=1e-5), "the engine's norm before clipping"
    assert len(got["eval_losses"]) == 2 and got["eval_losses"] == pytest.approx(want["eval_losses"], rel=1e-5)
    failures = compare(got["consolidated"], want["params"], model=hf_model(model), plan=got["plan"], steps=STEPS)
    assert not failures, f"{model}-z{stage}: " + "; ".join(failures)


@pytest.mark.parametrize("model,stage", CASES, ids=[f"{m}-z{s}" for m, s in CASES])
def test_saved_model_reloads_with_from_pretrained(spawned, model, stage):
    got = job_result(spawned, f"{model}-z{stage}")
    assert "model.safetensors" in got["saved_files"] and "training_args.bin" in got["saved_files"]
    reloaded, trained = got["reloaded"], got["consolidated"]
    assert set(reloaded) == set(trained), "every weight saved (Llama's untied lm_head too)"
    for name, tensor in trained.items():
        assert torch.equal(reloaded[name], tensor), f"{name} reloads as trained"


def test_config_auto_values_come_from_training_arguments(spawned):
    plan = job_result(spawned, "gpt2-z2")["plan"]
    assert plan.batch.micro_batch_size == ARGS["per_device_train_batch_size"]
    assert plan.batch.gradient_accumulation_steps == ARGS["gradient_accumulation_steps"]
    assert plan.optimizer.gradient_clipping == ARGS["max_grad_norm"]
    assert plan.offload.optimizer.device == "cpu", "axolotl's zero2.json offloads the optimizer state"
    blocks = job_result(spawned, "blocks")["plan"]
    assert blocks.optimizer.type == "AdamW" and blocks.optimizer.lr == ARGS["learning_rate"]
    assert tuple(blocks.optimizer.betas) == (0.9, ARGS["adam_beta2"]) and blocks.optimizer.eps == 1e-8
    assert blocks.optimizer.weight_decay == ARGS["weight_decay"]
    assert blocks.scheduler.type == "WarmupLR"
    assert blocks.scheduler.params["warmup_max_lr"] == ARGS["learning_rate"]
    assert blocks.scheduler.params["warmup_num_steps"] == ARGS["warmup_steps"]


def test_trainer_checkpoint_resumes_to_the_uninterrupted_run(spawned, one_thread):
    got, whole = job_result(spawned, "resumed"), job_result(spawned, "llama-z3")
    assert got["steps"] == STEPS
    # the log history is the checkpoint's (steps 1-3) and the resumed run's (steps 4-6)
    assert got["losses"] == pytest.approx(whole["losses"], rel=1e-6)
    assert got["lrs"] == pytest.approx(whole["lrs"], rel=1e-12), "the Trainer's scheduler resumed"
    for name, tensor in whole["consolidated"].items():
        assert torch.allclose(got["consolidated"][name], tensor, rtol=0, atol=1e-6), name


def test_mismatched_config_values_are_refused_all_at_once(spawned):
    text = job_result(spawned, "refused")["mismatch"]
    assert "gradient_clipping" in text and "max_grad_norm is 0.5" in text
    assert "train_micro_batch_size_per_gpu" in text and "per_device_train_batch_size is 2" in text
    assert '"auto"' in text


def test_tensor_parallel_plans_are_refused_with_the_reason(spawned):
    text = job_result(spawned, "refused")["tp"]
    assert "data parallelism only" in text and "tp 2" in text


def _training_args(tmp_path, **extra):
    import transformers

    return transformers.TrainingArguments(output_dir=str(tmp_path), **{**ARGS, **extra})


def test_auto_values_filled_as_hugging_face_fills_them(tmp_path):
    from zeroplan.integrations.transformers import fill_from_training_args

    config = {"train_batch_size": "auto", "gradient_accumulation_steps": "auto",
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                                "warmup_num_steps": "auto", "total_num_steps": "auto"}},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "param_persistence_threshold": "auto"}}
    got = fill_from_training_args(config, args=_training_args(tmp_path), model=hf_model("llama"),
                                  num_training_steps=30, world_size=4)
    assert got["train_batch_size"] == 4 * 2 * 2 and got["gradient_accumulation_steps"] == 2
    assert "train_micro_batch_size_per_gpu" not in got, "a key the config leaves out stays out"
    assert got["optimizer"]["params"] == {"lr": 3e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}
    assert got["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 2,
                                          "total_num_steps": 30}
    zero = got["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["param_persistence_threshold"]) \
        == (32 * 32, int(0.9 * 32 * 32), 320), "sized from the Llama config's hidden_size 32"
    assert config["train_batch_size"] == "auto", "the caller's config is not changed"


def test_auto_bucket_sizes_need_a_hidden_size(tmp_path):
    from zeroplan.integrations.transformers import fill_from_training_args
    from zeroplan.schemas import ConfigError

    config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size.*hidden_size"):
        fill_from_training_args(config, args=_training_args(tmp_path), model=torch.nn.Linear(2, 2),
                                num_training_steps=3, world_size=1)


def test_trainer_arguments_that_bring_another_engine_are_refused(tmp_path):
    import transformers

    from zeroplan.integrations.transformers import ZeroplanTrainer
    from zeroplan.schemas import ConfigError

    args = _training_args(tmp_path, fsdp="full_shard")
    with pytest.raises(ConfigError, match="TrainingArguments.fsdp"):
        ZeroplanTrainer(model=hf_model("gpt2"), args=args, config={})
