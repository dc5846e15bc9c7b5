"""The knobs: config keys whose value zeroplan may choose for the user, and from which values.

One table serves both searches. `zeroplan compile --resolve-auto` ranks every combination of
the "auto" knobs by the cost model (compiler/search.py); `zeroplan autotune` measures a sample
of them (autotune/space.py). Each knob says:

- its `kind` (what `autotuning.space` may give for it);
- how compile decides an "auto" value: `search` (ranked among its candidates), `rule` (a
  conventional value: Hugging Face's hidden-size rule for bucket sizes, compiler/autoresolve.py)
  or `derived` (DeepSpeed's batch arithmetic fills it from the others);
- whether the tuner may measure it (`tunable`: "auto" or a range in `autotuning.space`);
- its candidate values when "auto" (`candidates`), except the parallel degrees, which are
  enumerated together as the factorisations of the world size that split the model
  (compiler/degrees.py's `degree_choices`), because the three are not independent;
- `only_if`: the knob exists only when another takes a value (offloading parameters is ZeRO-3's).

`conflict` is the one validity rule across knobs that both searches apply before compiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

KnobKind = Literal["int", "bool", "device"]
Decision = Literal["search", "rule", "derived"]

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
"""Micro-batch candidates: powers of two, up to what a rank's memory plausibly holds."""


@dataclass(frozen=True)
class KnobContext:
    """What a knob's candidates depend on in the rest of the config."""

    nvme_blocks: frozenset[str] = frozenset()
    """Offload blocks ("offload_optimizer", "offload_param") that configure an `nvme_path`."""
    global_batch: int | None = None
    """train_batch_size when the config fixes it."""
    dp: int = 1
    """The data-parallel degree the micro-batch must fit the global batch with."""


@dataclass(frozen=True)
class Knob:
    key: str
    """Dotted config key."""
    kind: KnobKind
    compile: Decision
    tunable: bool = True
    values: tuple[Any, ...] | None = None
    """Fixed candidates; None where they depend on the config (see `candidates`)."""
    degree: bool = False
    """One of the parallel degrees, searched jointly."""
    only_if: tuple[str, Any] | None = None
    """(key, value): the knob exists only when that key takes that value."""


_BUCKETS = (50_000_000, 200_000_000, 500_000_000)
_BOOL = (False, True)

KNOBS: tuple[Knob, ...] = (
    Knob("train_micro_batch_size_per_gpu", "int", "search"),
    Knob("gradient_accumulation_steps", "int", "derived", values=(1, 2, 4, 8)),
    Knob("train_batch_size", "int", "derived", tunable=False),
    Knob("zero_optimization.stage", "int", "search", values=(0, 1, 2, 3)),
    Knob("zero_optimization.offload_optimizer.device", "device", "search"),
    Knob("zero_optimization.offload_param.device", "device", "search", only_if=("zero_optimization.stage", 3)),
    Knob("zero_optimization.reduce_bucket_size", "int", "rule", values=_BUCKETS),
    Knob("zero_optimization.allgather_bucket_size", "int", "rule", values=_BUCKETS),
    Knob("zero_optimization.stage3_prefetch_bucket_size", "int", "rule", values=_BUCKETS),
    Knob("zero_optimization.overlap_comm", "bool", "search", values=_BOOL),
    Knob("activation_checkpointing.enabled", "bool", "search", values=_BOOL),
    Knob("parallel.dp", "int", "search", degree=True),
    Knob("parallel.tp", "int", "search", degree=True),
    Knob("tensor_parallel.autotp_size", "int", "search", tunable=False, degree=True),
    Knob("parallel.pp", "int", "search", degree=True),
)
"""Every knob, in the order the tuner's dimensions follow."""

BY_KEY: dict[str, Knob] = {k.key: k for k in KNOBS}
TUNABLE: dict[str, KnobKind] = {k.key: k.kind for k in KNOBS if k.tunable}
"""Knobs `autotuning.space` may range over, with the kind of value each takes."""
SEARCHED: tuple[str, ...] = tuple(k.key for k in KNOBS if k.compile != "rule")
"""Keys compile's `--resolve-auto` settles by its search (ranked or derived), not by a rule."""
DEGREE_KEYS: tuple[str, ...] = tuple(k.key for k in KNOBS if k.degree)
DEVICES = ("none", "cpu", "nvme")


def candidates(key: str, *, context: KnobContext) -> tuple[Any, ...]:
    """The values worth trying for an "auto" `key`: offload devices none and cpu (nvme too where
    the block has an nvme_path); micro-batches the powers of two that divide the fixed global
    batch per data-parallel rank. ValueError for a degree (see `degree_choices`) or a key that
    is not a knob."""
    knob = BY_KEY.get(key)
    if knob is None or knob.degree:
        raise ValueError(f"{key!r} has no candidate list of its own" + (" (degrees are enumerated together)"
                                                                       if knob else ": not a knob"))
    if knob.values is not None:
        return knob.values
    if knob.kind == "device":
        block = key.split(".")[1]
        return DEVICES if block in context.nvme_blocks else DEVICES[:2]
    if key == "train_micro_batch_size_per_gpu":
        glob = context.global_batch
        if glob is None:
            return MICRO_BATCHES
        per_rank = max(glob // context.dp, 1)
        return tuple(m for m in MICRO_BATCHES if m <= per_rank and glob % m == 0) or (1,)
    raise ValueError(f"{key!r} is decided from the others, not chosen")


def conflict(values: Mapping[str, Any]) -> str | None:
    """Why these knob values cannot go together (the schema would refuse them), or None.
    Keys missing from `values` are taken as their defaults."""
    stage = values.get("zero_optimization.stage", 0)
    stage = stage if isinstance(stage, int) else 0
    offload_param = values.get("zero_optimization.offload_param.device", "none")
    offload_optimizer = values.get("zero_optimization.offload_optimizer.device", "none")
    if offload_param not in (None, "none") and stage != 3:
        return f"offload_param needs ZeRO stage 3 (stage {stage})"
    if offload_optimizer not in (None, "none") and stage == 0:
        return "offload_optimizer needs ZeRO stage 1 or more (stage 0)"
    return None
