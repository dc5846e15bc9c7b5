"""Turn raw config data into a `TrainConfig`, or a `ConfigError` listing every problem.

    config = load_config("ds_config.json", overrides=["zero_optimization.stage=2"])

Steps: read (sources.py) -> apply overrides -> remap deprecated and drop recognised DeepSpeed
keys (deepspeed_keys.py) -> pydantic validation -> translate pydantic's errors into
`Problem`s with key paths and did-you-mean suggestions -> notices as `ConfigWarning`s.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ValidationError

from .config import TrainConfig
from .deepspeed_keys import RECOGNISED_UNUSED, normalise
from .errors import NOT_GIVEN, ConfigError, ConfigWarning, Problem
from .sources import apply_overrides, read_config_file

_TYPE_MESSAGES = {
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "missing": "is required",
}


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    world_size: int | None = None,
) -> TrainConfig:
    """Validate a config from a file path, a mapping, or nothing (defaults only).

    With `world_size`, the parallel degrees and the batch triple are also checked for that
    many processes. Raises ConfigError with every problem found; emits one ConfigWarning
    per notice (also when it raises, so the user sees everything at once).
    """
    if source is None:
        data, name = {}, "defaults"
    elif isinstance(source, Mapping):
        data, name = copy.deepcopy(dict(source)), "config"
    else:
        data, name = read_config_file(source), str(source)
    data = apply_overrides(data, overrides)
    return validate_config(data, source=name, world_size=world_size)


def validate_config(data: dict, *, source: str = "config", world_size: int | None = None) -> TrainConfig:
    """Validate already-parsed data (modified in place by the DeepSpeed remapping)."""
    if not isinstance(data, dict):
        raise ConfigError(Problem("", "the top level must be a mapping of keys", given=data), source=source)
    notices, problems = normalise(data)
    try:
        config = TrainConfig.model_validate(data, context={"world_size": world_size})
    except ValidationError as e:
        problems += problems_from_validation(e)
    else:
        notices += config_notices(config)
    for notice in notices:
        warnings.warn(notice, ConfigWarning, stacklevel=2)
    if problems:
        raise ConfigError(problems, source=source)
    return config


NOT_ACTED_ON: dict[str, tuple[str, str]] = {
    "comet": ("enabled", "zeroplan writes no Comet experiment (it writes tensorboard, csv_monitor and wandb)"),
    "checkpoint": ("", "zeroplan's checkpoints are per-rank shards with hashes, checked on load; these options "
                   "change nothing"),
    "aio": ("", "zeroplan's NVMe offload does its own file I/O (O_DIRECT where the filesystem allows it); these "
            "settings change nothing"),
    "compile": ("", "zeroplan runs no DeepCompile or torch.compile passes; these settings change nothing"),
}
"""Blocks the schema accepts (real DeepSpeed configs carry them) that zeroplan does not act on:
block -> (the switch that turns it on, "" for any key given; why it has no effect)."""

CHECKPOINTING_NOT_ACTED_ON = {
    "contiguous_memory_optimization": "zeroplan keeps each checkpoint as its own tensor",
    "number_checkpoints": "it sizes DeepSpeed's contiguous checkpoint buffer, which zeroplan does not keep; every "
                          "block is recomputed",
    "synchronize_checkpoint_boundary": "zeroplan does not synchronise the device at checkpoint boundaries",
    "profile": "zeroplan does not time the recompute (logging.wall_clock_breakdown times backward)",
}


def config_notices(config: TrainConfig) -> list[str]:
    """Valid but not what it seems: keys with no effect at the chosen settings, and blocks
    zeroplan accepts without acting on them (one notice each, never silence)."""
    notices = []
    stage = config.zero_optimization.stage
    if isinstance(stage, int) and stage < 3:
        for key in config.zero_optimization.stage3_keys_given():
            notices.append(f"zero_optimization.{key} has no effect at stage {stage} (only at stage 3)")
    z = config.zero_optimization
    if z.contiguous_gradients is False:
        notices.append("zero_optimization.contiguous_gradients false has no effect: zeroplan always reduces "
                       "gradients through contiguous buckets")
    if config.fp16.fp16_master_weights_and_grads is True:
        notices.append("fp16.fp16_master_weights_and_grads has no effect: zeroplan keeps fp32 master weights and "
                       "gradients (more memory than DeepSpeed's fp16 masters, none of their rounding)")
    if z.stage3_gather_16bit_weights_on_model_save is True:
        notices.append("zero_optimization.stage3_gather_16bit_weights_on_model_save has no effect: "
                       "engine.full_state_dict() gathers the whole model at every stage")
    if "max_in_cpu" in z.offload_param.model_fields_set:
        notices.append("zero_optimization.offload_param.max_in_cpu has no effect: with nvme every parameter "
                       "partition lives in its file")
    if stage == 3 and config.zero_optimization.reduce_scatter is False:
        notices.append("zero_optimization.reduce_scatter false has no effect at stage 3, which always "
                       "reduce-scatters gradients (as in DeepSpeed)")
    for block, (switch, why) in NOT_ACTED_ON.items():
        value = getattr(config, block)
        if (getattr(value, switch) is True) if switch else value.model_fields_set:
            notices.append(f"{block} is accepted but not acted on: {why}")
    if config.parallel.sequence_parallel is True and config.tp in (None, 1):
        notices.append("parallel.sequence_parallel has no effect at tp 1: there is no tensor-parallel group to split "
                       "the sequence over (as in Megatron-LM); set parallel.tp > 1")
    ac = config.activation_checkpointing
    if ac.model_fields_set and "enabled" not in ac.model_fields_set:
        notices.append("activation_checkpointing is given without 'enabled': nothing is recomputed (DeepSpeed "
                       "leaves that to the training script); set activation_checkpointing.enabled true to have "
                       "zeroplan recompute each block")
    for key in sorted(ac.model_fields_set & CHECKPOINTING_NOT_ACTED_ON.keys()):
        if getattr(ac, key) not in (False, None):
            notices.append(f"activation_checkpointing.{key} has no effect: {CHECKPOINTING_NOT_ACTED_ON[key]}")
    return notices


def problems_from_validation(error: ValidationError) -> list[Problem]:
    """pydantic's errors as Problems with dotted paths, given values and suggestions."""
    problems: list[Problem] = []
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"])
        nested = (err.get("ctx") or {}).get("error")
        if isinstance(nested, ConfigError):  # a block's cross-field rules
            problems += [_prefixed(p, loc) for p in nested.problems]
        elif err["type"] == "extra_forbidden":
            problems.append(Problem(".".join(loc), "unknown key", given=err["input"],
                                    suggestion=_did_you_mean(loc)))
        else:
            message = _TYPE_MESSAGES.get(err["type"], err["msg"])
            given = NOT_GIVEN if err["type"] == "missing" else err["input"]
            problems.append(Problem(".".join(loc), message, given=given))
    return problems


def _prefixed(problem: Problem, loc: tuple[str, ...]) -> Problem:
    path = ".".join(p for p in (*loc, problem.path) if p)
    return Problem(path, problem.message, problem.given, problem.suggestion)


def _model_fields_at(loc: tuple[str, ...]) -> list[str]:
    """Field names (and aliases) of the model that holds the key at `loc`."""
    model: Any = TrainConfig
    for part in loc[:-1]:
        field = _field(model, part) if _is_model(model) else None
        if field is None:
            if isinstance(model, dict):  # walked into a dict[str, Model]: any key is fine
                model = model["value"]
                continue
            return []
        model = _nested_model(field.annotation)
    if not _is_model(model):
        return []
    names = list(model.model_fields)
    names += [f.alias for f in model.model_fields.values() if f.alias]
    return names


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _field(model: type[BaseModel], name: str):
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _nested_model(annotation: Any) -> Any:
    """The model class inside Optional/Union/Annotated, or {"value": Model} for dict[str, Model]."""
    origin = typing.get_origin(annotation)
    if _is_model(annotation):
        return annotation
    if origin is dict:
        value = _nested_model(typing.get_args(annotation)[1])
        return {"value": value} if value is not None else None
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None


def _all_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every key name in the schema -> the dotted paths where it lives."""
    index: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        index.setdefault(name, []).append(".".join((*prefix, name)))
        inner = _nested_model(field.annotation)
        if _is_model(inner):
            for key, paths in _all_paths(inner, (*prefix, name)).items():
                index.setdefault(key, []).extend(paths)
    return index


def _did_you_mean(loc: tuple[str, ...]) -> str:
    key = loc[-1]
    siblings = _model_fields_at(loc)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.75)
    if close:
        return f"did you mean '{close[0]}'?"
    elsewhere = [p for p in _all_paths(TrainConfig).get(key, []) if p != ".".join(loc)]
    if elsewhere:
        return f"'{key}' belongs at {' or '.join(elsewhere)}"
    recognised = RECOGNISED_UNUSED.get(loc[:-1], frozenset())
    close = difflib.get_close_matches(key, [*siblings, *recognised], n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "remove it, or run `zeroplan schema` to see the keys this block takes"
