"""DeepSpeed keys zeroplan accepts without using, and deprecated keys it remaps.

Real `ds_config.json` files carry blocks for features zeroplan does not implement
(compression, elasticity, ...). Rejecting them would make those files unusable, and
ignoring them silently is what DeepSpeed does with typos. So they are named here, removed
before validation, and each produces one notice. Anything not named here and not in the
schema is an error.

Deprecated spellings (`cpu_offload`, `bfloat16`, ...) are rewritten to the current keys
with a notice; when both spellings are given, that is an error. DeepSpeed's own second
spelling of a ZeRO key (`max_live_parameters` for `stage3_max_live_parameters`, see
`zero.DEEPSPEED_FIELD_NAMES`) is read silently; both spellings with different values is an error.

DeepSpeed reads its top level with `dict.get`, so keys it does not define are ignored there;
the ones real configs carry (`IGNORED_BY_DEEPSPEED`, comment keys) are dropped here with a
notice saying they have no effect in either, and every other unknown key stays an error.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import Problem
from .zero import DEEPSPEED_FIELD_NAMES

RECOGNISED_UNUSED: dict[tuple[str, ...], frozenset[str]] = {
    (): frozenset({
        "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
        "dump_state", "memory_breakdown", "seq_parallel_communication_data_type",
        "pipeline", "data_efficiency", "hybrid_engine", "data_types",
        "dataloader_drop_last", "disable_allgather", "weight_quantization", "timers",
        "torch_autocast", "use_data_before_expert_parallel_", "zenflow",
        "checkpoint_parallel_write_pipeline", "load_universal_checkpoint", "fp8",
        "use_data_before_expert_parallelism", "disable_python_gc", "log_level",
    }),
    ("zero_optimization",): frozenset({
        "legacy_stage1", "zero_hpz_partition_size", "zero_quantized_weights",
        "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
        "memory_efficient_linear", "pipeline_loading_checkpoint",
        "override_module_apply", "use_multi_rank_bucket_allreduce",
        "log_trace_cache_warnings", "module_granularity_threshold", "use_all_reduce_for_fetch_params",
        "stage3_use_all_reduce_for_fetch_params", "stage3_module_granularity_threshold",
        "reduce_scatter_dtype", "prefetch_sharded_params", "allgather_sequential",
        "stage3_allgather_sequential", "parameter_alignment", "enable_sanity_checks", "compute_grad_norm",
        "save_muon_momentum_buffer_in_memory", "leaf_module", "zenflow",
    }),
    ("optimizer",): frozenset({"legacy_fusion"}),
    ("bf16",): frozenset({"check_grad_overflow", "bf16_master_weights_and_grads", "bf16_optimizer_states"}),
    ("checkpoint",): frozenset({"writer"}),
    ("autotuning",): frozenset({
        "fast", "exps_dir", "start_profile_step", "end_profile_step", "metric_path", "arg_mappings",
        "model_info", "model_info_path", "max_train_batch_size", "min_train_batch_size",
        "max_train_micro_batch_size_per_gpu", "min_train_micro_batch_size_per_gpu",
        "num_tuning_micro_batch_sizes", "tuner_type", "tuner_early_stopping", "mp_size",
    }),
}
"""Keys DeepSpeed defines that zeroplan does not use, by the path of the block holding them."""

REMOVED_BY_DEEPSPEED: dict[tuple[str, ...], dict[str, str]] = {
    (): {
        "nebula": "Nebula checkpointing is gone; checkpoints would silently be plain local files",
        "compression_training": "the compression library is gone; the model would train unquantized",
        "amp": "the Apex AMP integration is gone; use 'fp16' or 'bf16'",
        "quantize_training": "Mixture-of-Quantization is gone",
        "sparse_gradients": "sparse reduction of dense embedding gradients is gone",
        "eigenvalue": "eigenvalue-based quantization is gone",
        "sparse_attention": "Sparse Attention is gone",
        "elasticity": "elastic training is gone; give the batch keys directly",
        "graph_harvesting": "graph harvesting is gone",
        "curriculum_learning": "the legacy top-level block is gone; DeepSpeed reads "
                               "data_efficiency.data_sampling.curriculum_learning",
        "progressive_layer_drop": "Progressive Layer Dropping is gone",
    },
    ("zero_optimization",): {
        "mics_shard_size": "MiCS sharding is gone",
        "mics_hierarchical_params_gather": "MiCS sharding is gone",
        "zeropp_loco_param": "LoCo-ZeRO++ is gone",
    },
}
"""Keys DeepSpeed 0.19 removed and refuses (DeepSpeedConfigError, its runtime/config.py):
a config carrying one would not run under DeepSpeed either, so it is an error here too."""


def refuse_removed(data: dict, problems: list[Problem]) -> None:
    """One problem per key DeepSpeed removed (REMOVED_BY_DEEPSPEED), naming why."""
    for path, keys in REMOVED_BY_DEEPSPEED.items():
        block = _block(data, path)
        if block is None:
            continue
        for key in sorted(keys.keys() & block.keys()):
            problems.append(Problem(_dotted(path, key), f"DeepSpeed removed this and refuses configs that carry "
                                    f"it: {keys[key]}", given=block.pop(key), suggestion=f"remove '{key}'"))

ULYSSES_KEY = "sequence_parallel_size"
"""DeepSpeed's Ulysses degree (Jacobs et al. 2023, "DeepSpeed Ulysses"): the sequence split over
its own group, all-to-all around attention. zeroplan has no Ulysses; its
`parallel.sequence_parallel` is Megatron-LM's sequence parallelism inside the tp group."""


def refuse_ulysses(data: dict, notices: list[str], problems: list[Problem]) -> None:
    """`sequence_parallel_size`: 1 (DeepSpeed's default) is dropped with a notice; any other
    value is an error that says what zeroplan offers instead."""
    if ULYSSES_KEY not in data:
        return
    value = data.pop(ULYSSES_KEY)
    if value == 1 and not isinstance(value, bool):
        notices.append(f"recognised DeepSpeed key '{ULYSSES_KEY}' (Ulysses sequence parallelism) is 1, its "
                       "default: no effect")
        return
    problems.append(Problem(ULYSSES_KEY, "DeepSpeed-Ulysses sequence parallelism (all-to-all over attention heads "
                            "in a sequence-parallel group) is not implemented by zeroplan", given=value,
                            suggestion="remove it; for Megatron-style sequence parallelism within the tensor-"
                            "parallel group set parallel.tp > 1 and parallel.sequence_parallel true"))


IGNORED_BY_DEEPSPEED: dict[str, str] = {
    "comms_config": "DeepSpeed's communication logger reads the 'comms_logger' block",
    "monitor_config": "DeepSpeed's monitors read the top-level 'tensorboard', 'wandb', 'csv_monitor' and "
                      "'comet' blocks",
}
"""Top-level keys of real configs (LLaMA-Factory's) that are not DeepSpeed keys: DeepSpeed never
reads them, so they change nothing there either."""

COMMENT_PREFIXES = ("_comment", "//")
"""Top-level keys starting with these are JSON comments (`"_comment": "..."`)."""


def drop_ignored(data: dict, notices: list[str]) -> None:
    """Remove top-level keys DeepSpeed ignores (IGNORED_BY_DEEPSPEED, comments), one notice each."""
    for key in sorted(k for k in data if isinstance(k, str)):
        if key in IGNORED_BY_DEEPSPEED:
            del data[key]
            notices.append(f"'{key}' is not a DeepSpeed key and has no effect there or here: "
                           f"{IGNORED_BY_DEEPSPEED[key]}")
        elif key.startswith(COMMENT_PREFIXES):
            del data[key]
            notices.append(f"'{key}' is read as a comment (DeepSpeed ignores top-level keys it does not define)")


def _canonical(value: Any) -> Any:
    """A value as the schema will read it, to compare two spellings of one key: 5e8 == "5e8"."""
    if isinstance(value, bool):
        return ("flag", value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "false", "auto"):
            return ("flag", text == "true") if text != "auto" else ("auto", None)
        try:
            return ("number", float(text.replace("_", "")))
        except ValueError:
            return ("text", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    return ("other", repr(value))


def read_field_names(data: dict, notices: list[str], problems: list[Problem]) -> None:
    """DeepSpeed's field names of ZeRO keys (zero.DEEPSPEED_FIELD_NAMES) -> zeroplan's spelling."""
    zero = _block(data, ("zero_optimization",))
    if zero is None:
        return
    for name, field in DEEPSPEED_FIELD_NAMES.items():
        if name not in zero:
            continue
        value = zero.pop(name)
        if field not in zero:
            zero[field] = value
        elif _canonical(zero[field]) != _canonical(value):
            problems.append(Problem(f"zero_optimization.{name}", f"DeepSpeed's other spelling of '{field}', which "
                                    f"is also given with a different value ({zero[field]!r})", given=value,
                                    suggestion=f"give one of '{name}' and '{field}'"))


_HINTS = {
    ("autotuning",): "zeroplan's tuner reads autotuning.space and the other keys in its schema",
}


def _dotted(path: tuple[str, ...], key: str) -> str:
    return ".".join((*path, key))


def _block(data: dict, path: tuple[str, ...]) -> dict | None:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


def drop_recognised(data: dict, notices: list[str]) -> None:
    """Remove recognised-but-unused DeepSpeed keys from `data`, one notice each."""
    for path, keys in RECOGNISED_UNUSED.items():
        block = _block(data, path)
        if block is None:
            continue
        for key in sorted(keys & block.keys()):
            del block[key]
            hint = _HINTS.get(path, "it is accepted for compatibility and has no effect")
            notices.append(f"recognised DeepSpeed key '{_dotted(path, key)}' is not used by zeroplan; {hint}")


def _rename(path: tuple[str, ...], old: str, new: str) -> Callable[[dict, list[str], list[Problem]], None]:
    def remap(data: dict, notices: list[str], problems: list[Problem]) -> None:
        block = _block(data, path)
        if block is None or old not in block:
            return
        if new in block:
            problems.append(Problem(_dotted(path, old), f"deprecated spelling of '{_dotted(path, new)}', "
                                    "which is also given", given=block[old], suggestion=f"remove '{old}'"))
            return
        block[new] = block.pop(old)
        notices.append(f"deprecated key '{_dotted(path, old)}' read as '{_dotted(path, new)}'")

    return remap


def _zero_as_bool(data: dict, notices: list[str], problems: list[Problem]) -> None:
    value = data.get("zero_optimization")
    if isinstance(value, bool):
        data["zero_optimization"] = {"stage": 1 if value else 0}
        notices.append(f"deprecated 'zero_optimization: {str(value).lower()}' read as "
                       f"'zero_optimization.stage: {1 if value else 0}'")


def _move_into(field: str, target: str, key: str, convert: Callable[[Any], Any]):
    """zero_optimization.<field> (old flat key) -> zero_optimization.<target>.<key>."""

    def remap(data: dict, notices: list[str], problems: list[Problem]) -> None:
        zero = _block(data, ("zero_optimization",))
        if zero is None or field not in zero:
            return
        value = zero.pop(field)
        sub = zero.setdefault(target, {})
        if not isinstance(sub, dict):
            return  # the schema reports the wrong type of the target block
        if key in sub:
            problems.append(Problem(f"zero_optimization.{field}",
                                    f"deprecated; conflicts with zero_optimization.{target}.{key}, which is given",
                                    given=value, suggestion=f"remove '{field}'"))
            return
        sub[key] = convert(value)
        notices.append(f"deprecated key 'zero_optimization.{field}' read as "
                       f"zero_optimization.{target}.{key} = {sub[key]!r}")

    return remap


def _device(value: Any) -> Any:
    return ("cpu" if value else "none") if isinstance(value, bool) else value


DEPRECATIONS = (
    _rename((), "bfloat16", "bf16"),
    _zero_as_bool,
    _move_into("cpu_offload", "offload_optimizer", "device", _device),
    _move_into("cpu_offload_params", "offload_param", "device", _device),
    _move_into("cpu_offload_use_pin_memory", "offload_optimizer", "pin_memory", lambda v: v),
    _rename(("zero_optimization",), "stage3_gather_fp16_weights_on_model_save",
            "stage3_gather_16bit_weights_on_model_save"),
    _rename(("aio",), "thread_count", "intra_op_parallelism"),
    _rename(("autotuning",), "tuner_num_trials", "max_trials"),
)


def normalise(data: dict) -> tuple[list[str], list[Problem]]:
    """Rewrite deprecated keys and drop recognised-unused ones, in place.

    Returns the notices to show and any problems (two spellings of one key).
    """
    notices: list[str] = []
    problems: list[Problem] = []
    for remap in DEPRECATIONS:
        remap(data, notices, problems)
    read_field_names(data, notices, problems)
    refuse_removed(data, problems)
    drop_ignored(data, notices)
    refuse_ulysses(data, notices, problems)
    drop_recognised(data, notices)
    return notices, problems
