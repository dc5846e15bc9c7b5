"""Deciding the config's "auto" fields at compile time, and recording why.

Two kinds of "auto":
- settings with a conventional answer (learning-rate values, bucket sizes, precision): filled
  by a fixed rule, the one Hugging Face's DeepSpeed integration applies where it has one
  (transformers/integrations/deepspeed.py: reduce_bucket_size = hidden^2,
  stage3_prefetch_bucket_size = 0.9 * hidden^2, stage3_param_persistence_threshold = 10 * hidden);
- performance choices (degrees, ZeRO stage, offload targets, micro-batch, overlap,
  checkpointing): every combination is compiled and ranked by the cost model's predicted
  samples/s among those the memory model says fit (search.py). Measuring instead of
  predicting is `zeroplan autotune`'s job.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Problem, TrainConfig, is_auto

from .sections import DEFAULT_LR

SEARCHED = ("parallel.dp", "parallel.tp", "tensor_parallel.autotp_size", "parallel.pp", "zero_optimization.stage",
            "zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device",
            "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
            "zero_optimization.overlap_comm", "activation_checkpointing.enabled")
"""Keys decided by the cost-model search rather than by a rule."""

_OPTIMIZER_DEFAULTS = {"lr": DEFAULT_LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}


def auto_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of every field holding "auto", in declaration order."""
    found = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if is_auto(value):
            found.append(path)
        elif isinstance(value, BaseModel):
            found += auto_fields(value, prefix=f"{path}.")
    return found


def auto_problems(paths: list[str]) -> list[Problem]:
    """One problem per "auto" field, for a compile that was not asked to resolve them."""
    hint = "run `zeroplan autotune` to measure, or `zeroplan compile --resolve-auto` to let the cost model decide"
    return [Problem(p, "is 'auto'; a plan needs a concrete value", given="auto", suggestion=hint) for p in paths]


def get_path(data: dict, path: str) -> Any:
    for key in path.split("."):
        data = data.get(key, {}) if isinstance(data, dict) else {}
    return data


def set_path(data: dict, path: str, value: Any) -> None:
    """Set a dotted key in nested dicts (None removes it, so the schema derives or defaults it)."""
    *parents, leaf = path.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    if value is None:
        data.pop(leaf, None)
    else:
        data[leaf] = value


def _precision_rules(data: dict, autos: list[str], cluster: ClusterSpec) -> dict[str, str]:
    decided = {}
    bf16_auto, fp16_auto = "bf16.enabled" in autos, "fp16.enabled" in autos
    if not (bf16_auto or fp16_auto):
        return decided
    if cluster.device == "cpu":
        choice, why = "fp32", "fp32 on cpu: bf16 matmuls are slower than fp32 on most CPUs"
    elif bf16_auto:
        choice, why = "bf16", "bf16 on cuda: fp32 range, no loss scaling"
    else:
        choice, why = "fp16", "fp16 on cuda (bf16.enabled is false)"
    for key in ("bf16.enabled", "fp16.enabled"):
        if key in autos:
            set_path(data, key, key.startswith(choice))
            decided[key] = f"{str(key.startswith(choice)).lower()}: {why}"
    return decided


def _hidden_rules(data: dict, autos: list[str], model: ModelSpec) -> dict[str, str]:
    h, rules = model.hidden, {}
    table = {
        "zero_optimization.reduce_bucket_size": (h * h, "hidden^2"),
        "zero_optimization.allgather_bucket_size": (h * h, "hidden^2, as reduce_bucket_size"),
        "zero_optimization.stage3_prefetch_bucket_size": (int(0.9 * h * h), "0.9 * hidden^2"),
        "zero_optimization.stage3_param_persistence_threshold": (10 * h, "10 * hidden"),
    }
    for key, (value, why) in table.items():
        if key in autos:
            set_path(data, key, value)
            rules[key] = f"{value}: {why} (elements; Hugging Face's rule) for hidden {h}"
    return rules


def _training_rules(data: dict, autos: list[str]) -> tuple[dict[str, str], list[Problem]]:
    decided, problems = {}, []
    for name, value in _OPTIMIZER_DEFAULTS.items():
        key = f"optimizer.params.{name}"
        if key in autos:
            set_path(data, key, value)
            decided[key] = f"{value}: the optimizer's default"
    lr = get_path(data, "optimizer.params.lr") or DEFAULT_LR
    fixed = {"scheduler.params.warmup_min_lr": (0.0, "DeepSpeed's default"),
             "scheduler.params.warmup_max_lr": (lr, "the optimizer's learning rate"),
             "scheduler.params.warmup_num_steps": (1000, "DeepSpeed's default"),
             "scheduler.params.cycle_momentum": (True, "DeepSpeed's default"),
             "gradient_clipping": (1.0, "Hugging Face Trainer's max_grad_norm default, which 'auto' stands for")}
    for key, (value, why) in fixed.items():
        if key in autos:
            set_path(data, key, value)
            decided[key] = f"{value}: {why}"
    if "scheduler.params.total_num_steps" in autos:
        problems.append(Problem("scheduler.params.total_num_steps", "cannot be derived: the run's length is not "
                                "part of the config", given="auto", suggestion="give the number of optimizer steps"))
    if "parallel.pipeline.micro_batches" in autos:
        set_path(data, "parallel.pipeline.micro_batches", None)
        decided["parallel.pipeline.micro_batches"] = "gradient_accumulation_steps: one pipeline pass per step"
    return decided, problems


def apply_rules(config: TrainConfig, model: ModelSpec, cluster: ClusterSpec) -> tuple[dict, list[str], dict[str, str]]:
    """Fill the rule-decided autos: (config data, autos left for the search, decisions)."""
    autos = auto_fields(config)
    data = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    decided = _precision_rules(data, autos, cluster)
    decided |= _hidden_rules(data, autos, model)
    training, problems = _training_rules(data, autos)
    decided |= training
    refused = {p.path for p in problems}
    left = [a for a in autos if a not in decided and a not in refused]
    problems += [Problem(a, "compile has no rule for this 'auto' field", given="auto", suggestion="give a value")
                 for a in left if a not in SEARCHED]
    if problems:
        raise ConfigError(problems)
    return data, [a for a in left if a in SEARCHED], decided
