"""Deciding the config's "auto" fields at compile time, and recording why.

Hugging Face's Trainer and Accelerate write "auto" and fill it from TrainingArguments
(transformers/integrations/deepspeed.py, `trainer_config_process` and `trainer_config_finalize`).
zeroplan compiles the config without a Trainer, so each "auto" gets one of three answers:

- a conventional value, always (`apply_rules`): Hugging Face's rule where it derives one from the
  model (reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 * hidden^2,
  stage3_param_persistence_threshold = 10 * hidden), TrainingArguments' defaults for settings a
  run rarely changes (betas (0.9, 0.999), eps 1e-8, weight_decay 0, warmup_min_lr 0,
  gradient_clipping 1.0: `HF_DEFAULTS`), the batch keys DeepSpeed derives from the others, and
  precision by the device;
- one problem naming the TrainingArguments field, for what only the run can say: the learning
  rate, the warm-up and run length (TrainingArguments' defaults, lr 5e-5 and no warm-up, differ
  from DeepSpeed's, so neither is a safe guess), and the micro-batch when nothing fixes it;
- performance choices (degrees, ZeRO stage, offload targets, micro-batch, overlap,
  checkpointing): with `resolve_auto`, every combination is compiled and ranked by the cost
  model's predicted samples/s among those the memory model says fit (search.py); without it, a
  problem pointing at `--resolve-auto` and `zeroplan autotune`, which measures instead.

Every decision lands in the plan's `provenance.resolved_auto` with its reason.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Problem, TrainConfig, is_auto
from zeroplan.schemas.knobs import SEARCHED
from zeroplan.schemas.optim import OPTIMIZER_DEFAULTS

from .sections import DEFAULT_LR


_BATCH = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

HF_DEFAULTS: dict[str, tuple[object, str]] = {
    "optimizer.params.betas": ([0.9, 0.999], "TrainingArguments' adam_beta1, adam_beta2 defaults"),
    "optimizer.params.eps": (1e-8, "TrainingArguments' adam_epsilon default"),
    "optimizer.params.weight_decay": (0.0, "TrainingArguments' weight_decay default"),
    "scheduler.params.warmup_min_lr": (0.0, "what Hugging Face's integration always fills"),
    "scheduler.params.cycle_momentum": (True, "DeepSpeed's default"),
    "gradient_clipping": (1.0, "TrainingArguments' max_grad_norm default"),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": (False, "Accelerate's zero3_save_16bit_model "
                                                                           "default and DeepSpeed's"),
}
"""What "auto" means without a Trainer: the value the Trainer (or Accelerate) fills by default."""

TRAINER_ONLY: dict[str, tuple[str, str]] = {
    "optimizer.params.lr": ("learning_rate", "give a number (TrainingArguments' default is 5e-5, DeepSpeed's 1e-3)"),
    "scheduler.params.warmup_num_steps": ("warmup_steps or warmup_ratio", "give the number of warm-up steps"),
    "scheduler.params.total_num_steps": ("max_steps or num_train_epochs", "give the number of optimizer steps"),
}
""""auto" keys only the Trainer can fill: TrainingArguments field each comes from."""


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
    """One problem per performance "auto" field, for a compile that was not asked to search."""
    hint = "run `zeroplan autotune` to measure, or `zeroplan compile --resolve-auto` to let the cost model decide"
    problems = []
    for path in paths:
        message = "is 'auto'; a plan needs a concrete value"
        if path == "train_micro_batch_size_per_gpu":
            message += (" (Hugging Face's Trainer fills it from per_device_train_batch_size; train_batch_size and "
                        "gradient_accumulation_steps 'auto' are then derived)")
        problems.append(Problem(path, message, given="auto", suggestion=f"give a number, {hint}"
                                if path == "train_micro_batch_size_per_gpu" else hint))
    return problems


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
    enabled = next((d for d, key in (("bf16", "bf16.enabled"), ("fp16", "fp16.enabled"))
                    if get_path(data, key) is True), None)
    if enabled is not None:
        choice, why = enabled, f"{enabled}.enabled is true"
    elif cluster.device == "cpu":
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
    for key, (value, why) in HF_DEFAULTS.items():
        if key in autos:
            set_path(data, key, value)
            decided[key] = f"{value}: {why}"
    for key, (field, fix) in TRAINER_ONLY.items():
        if key in autos:
            problems.append(Problem(key, f"is 'auto', which Hugging Face's Trainer fills from its arguments ({field}); "
                                    "zeroplan compiles without a Trainer", given="auto", suggestion=fix))
    if "scheduler.params.warmup_max_lr" in autos:
        lr = get_path(data, "optimizer.params.lr")
        if "optimizer.params.lr" in autos:
            problems.append(Problem("scheduler.params.warmup_max_lr", "is 'auto', the learning rate, and "
                                    "optimizer.params.lr is 'auto' too", given="auto",
                                    suggestion="give optimizer.params.lr; warmup_max_lr 'auto' then follows it"))
        else:
            kind = get_path(data, "optimizer.type")
            lr = lr if lr != {} else OPTIMIZER_DEFAULTS.get(kind, {}).get("lr", DEFAULT_LR)
            set_path(data, "scheduler.params.warmup_max_lr", lr)
            decided["scheduler.params.warmup_max_lr"] = f"{lr}: the optimizer's learning rate, as Hugging Face fills it"
    if "parallel.pipeline.micro_batches" in autos:
        set_path(data, "parallel.pipeline.micro_batches", None)
        decided["parallel.pipeline.micro_batches"] = "gradient_accumulation_steps: one pipeline pass per step"
    return decided, problems


def _batch_rules(data: dict, autos: list[str]) -> dict[str, str]:
    """"auto" batch keys DeepSpeed's own derivation settles (schemas/batch.py): removed, so the
    batch resolution derives them from the concrete ones. The micro-batch stays for the search
    unless train_batch_size and gradient_accumulation_steps both fix it."""
    auto = [k for k in _BATCH if k in autos]
    concrete = {k for k in _BATCH if k not in autos and get_path(data, k) != {}}
    micro = "train_micro_batch_size_per_gpu"
    if micro in auto and concrete != {"train_batch_size", "gradient_accumulation_steps"}:
        return {}
    decided = {}
    for key in auto:
        set_path(data, key, None)
        decided[key] = "derived: train_batch_size = micro-batch x gradient_accumulation_steps x dp (DeepSpeed's rule)"
    return decided


def apply_rules(config: TrainConfig, model: ModelSpec, cluster: ClusterSpec, *,
                search: bool = True) -> tuple[dict, list[str], dict[str, str]]:
    """Fill the rule-decided autos: (config data, autos left for the search, decisions).
    ConfigError lists every "auto" that has no answer: those no rule decides, and, without
    `search`, those the search would."""
    autos = auto_fields(config)
    data = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    decided = _precision_rules(data, autos, cluster)
    decided |= _hidden_rules(data, autos, model)
    decided |= _batch_rules(data, autos)
    training, problems = _training_rules(data, autos)
    decided |= training
    refused = {p.path for p in problems}
    left = [a for a in autos if a not in decided and a not in refused]
    problems += [Problem(a, "compile has no rule for this 'auto' field", given="auto", suggestion="give a value")
                 for a in left if a not in SEARCHED]
    searched = [a for a in left if a in SEARCHED]
    if not search:
        micro = "train_micro_batch_size_per_gpu"
        derived = ("train_batch_size", "gradient_accumulation_steps") if micro in searched else ()
        problems = auto_problems([a for a in searched if a not in derived]) + problems
    if problems:
        raise ConfigError(problems)
    return data, searched, decided
