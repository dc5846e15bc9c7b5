"""The batch triple: global batch = micro-batch x gradient accumulation x dp degree.

DeepSpeed's rules (deepspeed/runtime/config.py `_configure_train_batch_size`):
all three given, they must agree; two given, the third is derived; only the global batch,
accumulation is 1; only the micro-batch, accumulation is 1. Messages say which numbers the
user gave and which were derived, so nobody hunts for a "2" they never wrote.
"""



from .errors import ConfigError, Problem
from .types import FrozenModel, is_auto

_GLOBAL, _MICRO, _ACCUM = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


class BatchPlan(FrozenModel):
    """A concrete batch triple for a given dp degree."""

    global_batch_size: int
    """Samples per optimizer step over all dp ranks."""
    micro_batch_size: int
    """Samples per rank per forward."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step."""
    derived: tuple[str, ...] = ()
    """Config keys that were derived rather than given."""


def _tag(value: int, key: str, derived: set[str]) -> str:
    return f"{value} ({'derived' if key in derived else 'given'})"


def _mismatch(glob: int, micro: int, accum: int, dp: int | None, derived: set[str]) -> Problem:
    dp_text = f" x dp {dp}" if dp is not None else ""
    return Problem(
        _GLOBAL,
        f"train_batch_size {_tag(glob, _GLOBAL, derived)} != micro-batch {_tag(micro, _MICRO, derived)}"
        f" x grad accumulation {_tag(accum, _ACCUM, derived)}{dp_text}",
        suggestion="change one of the three keys so global = micro x accumulation x dp",
    )


def batch_problems(glob, micro, accum, *, dp: int | None) -> list[Problem]:
    """What is inconsistent in a (possibly partial, possibly "auto") triple.

    With `dp=None` (world size unknown) only divisibility is checked; "auto" values are
    skipped: compile or autotune decides them.
    """
    values = {_GLOBAL: glob, _MICRO: micro, _ACCUM: accum}
    if any(is_auto(v) for v in values.values()):
        return []
    if glob is None and micro is None:
        return [Problem(_GLOBAL, "neither train_batch_size nor train_micro_batch_size_per_gpu is given",
                        suggestion="give at least one of them (or 'auto')")]
    if dp is None:
        return _divisibility_problems(glob, micro, accum)
    try:
        resolve_batch(glob, micro, accum, dp=dp)
    except ConfigError as e:
        return e.problems
    return []


def _divisibility_problems(glob, micro, accum) -> list[Problem]:
    per_rank = [(name, v) for name, v in (("micro-batch", micro), ("grad accumulation", accum)) if v is not None]
    if glob is None or not per_rank:
        return []
    product = 1
    for _, v in per_rank:
        product *= v
    if glob % product == 0:
        return []
    parts = " x ".join(f"{name} {v} (given)" for name, v in per_rank)
    return [Problem(_GLOBAL, f"train_batch_size {glob} (given) is not divisible by {parts}, so no dp degree fits",
                    given=glob, suggestion="change train_batch_size or the per-rank keys")]


def resolve_batch(glob: int | None, micro: int | None, accum: int | None, *, dp: int) -> BatchPlan:
    """The concrete triple for `dp` data-parallel ranks, or ConfigError naming given vs derived."""
    if dp < 1:
        raise ConfigError(Problem("parallel.dp", f"dp degree must be >= 1, got {dp}"))
    given = {k for k, v in ((_GLOBAL, glob), (_MICRO, micro), (_ACCUM, accum)) if v is not None}
    if given & {_GLOBAL, _MICRO} == set():
        raise ConfigError(batch_problems(None, None, accum, dp=None))
    if glob is not None and micro is not None and accum is None:
        accum = max(glob // (micro * dp), 1)
    elif glob is not None and accum is not None and micro is None:
        micro = max(glob // (accum * dp), 1)
    elif glob is None:
        accum = accum or 1
        glob = micro * accum * dp
    elif micro is None:
        accum, micro = 1, max(glob // dp, 1)
    derived = {_GLOBAL, _MICRO, _ACCUM} - given
    if glob != micro * accum * dp:
        raise ConfigError(_mismatch(glob, micro, accum, dp, derived))
    return BatchPlan(global_batch_size=glob, micro_batch_size=micro, gradient_accumulation_steps=accum,
                     derived=tuple(sorted(derived)))
