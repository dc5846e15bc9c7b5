"""A DeepSpeed config's `"auto"` values filled from `transformers.TrainingArguments`, as Hugging
Face fills them for DeepSpeed (its `HfTrainerDeepSpeedConfig`), so the config files written for
`Trainer(args=TrainingArguments(deepspeed=...))` mean the same under ZeroplanTrainer.

Each rule is (config key, the TrainingArguments value, its name, must it match). An `"auto"`
takes the value; a concrete value that differs from TrainingArguments' where the rule says it
must match is an error, every mismatch listed at once, as Hugging Face refuses them: the Trainer
would schedule, clip and count batches by one number and the engine by another. Keys the config
leaves out stay out (the plan's defaults apply, as DeepSpeed's do).

The hidden-size rules size the ZeRO buckets from the model's config (`hidden_size`, else the
largest of `hidden_sizes`, also under `text_config`): `reduce_bucket_size` hidden², at stage 3
`stage3_prefetch_bucket_size` 0.9 hidden² and `stage3_param_persistence_threshold` 10 hidden.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.types import is_auto_input

HIDDEN_KEYS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
               "zero_optimization.stage3_param_persistence_threshold")
"""The keys Hugging Face sizes from the model's hidden size (DeepSpeed's `stage3_*` spellings;
the unprefixed aliases are filled the same way)."""


def fill_from_training_args(config: Mapping[str, Any], *, args: Any, model: Any, num_training_steps: int,
                            world_size: int) -> dict[str, Any]:
    """A copy of `config` with its "auto" values filled from `args` (TrainingArguments), the
    model's config and the run's optimizer steps; ConfigError listing every value that
    contradicts TrainingArguments."""
    cfg = copy.deepcopy(dict(config))
    mismatches: list[Problem] = []
    for key, value, name, must_match in _rules(args, num_training_steps=num_training_steps, world_size=world_size):
        _fill(cfg, key, value, name=name, must_match=must_match, mismatches=mismatches)
    _fill_hidden(cfg, model)
    if mismatches:
        raise ConfigError(mismatches, source="the config given to ZeroplanTrainer")
    return cfg


def _rules(args: Any, *, num_training_steps: int, world_size: int) -> list[tuple[str, Any, str, bool]]:
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    auto_batch = bool(getattr(args, "auto_find_batch_size", False))
    return [
        ("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size", not auto_batch),
        ("gradient_accumulation_steps", accumulation, "gradient_accumulation_steps", True),
        ("train_batch_size", world_size * micro * accumulation,
         "train_batch_size (world size x per_device_train_batch_size x gradient_accumulation_steps)",
         not auto_batch),
        ("gradient_clipping", args.max_grad_norm, "max_grad_norm", True),
        ("optimizer.params.lr", args.learning_rate, "learning_rate", True),
        ("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "adam_beta1, adam_beta2", True),
        ("optimizer.params.eps", args.adam_epsilon, "adam_epsilon", True),
        ("optimizer.params.weight_decay", args.weight_decay, "weight_decay", True),
        ("scheduler.params.warmup_min_lr", 0, "(not a TrainingArguments value)", False),
        ("scheduler.params.warmup_max_lr", args.learning_rate, "learning_rate", True),
        ("scheduler.params.total_num_steps", num_training_steps, "the Trainer's optimizer steps", True),
        ("scheduler.params.warmup_num_steps", max(1, args.get_warmup_steps(num_training_steps)),
         "warmup_steps / warmup_ratio", True),
        ("fp16.enabled", bool(args.fp16 or args.fp16_full_eval), "fp16 or fp16_full_eval", True),
        ("bf16.enabled", bool(args.bf16 or args.bf16_full_eval), "bf16 or bf16_full_eval", True),
    ]


def _fill(cfg: dict, key: str, value: Any, *, name: str, must_match: bool, mismatches: list[Problem]) -> None:
    node, leaf = _node(cfg, key)
    if node is None or leaf not in node:
        return
    given = node[leaf]
    if is_auto_input(given):
        node[leaf] = value
    elif must_match and not _same(given, value):
        mismatches.append(Problem(key, f"differs from TrainingArguments: {name} is {value!r}",
                                  given=given, suggestion=f"set {key} to \"auto\" (it takes TrainingArguments' "
                                  f"value), or change {name.split(' ')[0]} to match"))


def _fill_hidden(cfg: dict, model: Any) -> None:
    zero = cfg.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    stage3 = zero.get("stage") == 3
    sizes = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    wanted = [k for k in (*sizes, "prefetch_bucket_size", "param_persistence_threshold") if is_auto_input(zero.get(k))]
    if not wanted:
        return
    hidden = _hidden_size(model)
    if hidden is None:
        raise ConfigError([Problem(f"zero_optimization.{k}", "\"auto\" is sized from the model config's "
                                   "hidden_size, and this model has none", given="auto",
                                   suggestion="give the key a number of elements") for k in wanted],
                          source="the config given to ZeroplanTrainer")
    for key in wanted:
        rule = sizes.get(key) or sizes[f"stage3_{key}"]
        if key == "reduce_bucket_size" or stage3:
            zero[key] = rule(hidden)
        # below stage 3 the stage-3 keys are unused: "auto" stays and compile records it


def _hidden_size(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for c in (config, getattr(config, "text_config", None)):
        if c is None:
            continue
        if isinstance(getattr(c, "hidden_size", None), int):
            return c.hidden_size
        if getattr(c, "hidden_sizes", None):
            return max(c.hidden_sizes)
    return None


def _node(cfg: dict, dotted: str) -> tuple[dict | None, str]:
    *path, leaf = dotted.split(".")
    node: Any = cfg
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None, leaf
    return (node, leaf) if isinstance(node, dict) else (None, leaf)


def _same(given: Any, value: Any) -> bool:
    if isinstance(given, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(given) == len(value) and all(_same(a, b) for a, b in zip(given, value))
    if isinstance(given, bool) or isinstance(value, bool):
        return given == value
    if isinstance(given, (int, float)) and isinstance(value, (int, float)):
        return float(given) == float(value)
    return given == value
