"""The search space: which config knobs the tuner chooses, and from which values.

A knob (schemas/knobs.py, the table compile's `--resolve-auto` search reads too) becomes a
dimension when the config gives it as "auto" or `autotuning.space` gives it a range;
everything else stays as the user fixed it. An "auto" knob takes its candidates from the
table; the micro-batch's are sized for pure data parallelism (global batch / world size).
The parallel degrees are one categorical dimension over the valid (dp, tp, pp)
factorisations of the world size (compiler/degrees.py's `degree_choices`: the rule compile
checks), written "dp.tp.pp", because the three are not independent; a knob with `only_if`
(offload_param: ZeRO-3's) is left out of a trial where its condition fails.

Dimensions are plain data; `suggest` asks an Optuna trial for values and `apply` writes
them into the config data, which is then validated and compiled like any other config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

from zeroplan.compiler.autoresolve import set_path
from zeroplan.compiler.degrees import degree_choices
from zeroplan.schemas import ModelSpec, TrainConfig, is_auto
from zeroplan.schemas.autotuning import KnobRange
from zeroplan.schemas.knobs import BY_KEY, DEGREE_KEYS, TUNABLE, KnobContext, candidates

DEGREES = "parallel.degrees"
"""The combined dp/tp/pp dimension, valued "dp.tp.pp"."""

_DEGREE_KNOBS = tuple(k for k in DEGREE_KEYS if k in TUNABLE)


@dataclass(frozen=True)
class Dimension:
    """One search dimension: categorical `choices`, or an integer range `low`..`high`."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: int | None = None
    high: int | None = None
    log: bool = False
    step: int | None = None
    only_if: tuple[str, Any] | None = None
    """(dimension, value): the dimension exists only when that one takes that value."""


class TrialLike(Protocol):
    """What `suggest` needs from an Optuna trial."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...


def _get(config: TrainConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def search_space(config: TrainConfig, *, world_size: int, model: ModelSpec) -> list[Dimension]:
    """The dimensions for this config, world size and model, in a stable order."""
    ranges: dict[str, KnobRange] = config.autotuning.space
    dims: list[Dimension] = []
    for path in TUNABLE:
        if path in _DEGREE_KNOBS:
            continue
        if path in ranges:
            dims.append(_from_range(path, ranges[path]))
        elif is_auto(_get(config, path)):
            dims.append(_default_dimension(path, config, world_size=world_size))
    degree_dim = _degree_dimension(config, world_size=world_size, model=model)
    if degree_dim is not None:
        dims.append(degree_dim)
    return [_conditional(d) for d in dims]


def _from_range(path: str, knob: KnobRange) -> Dimension:
    if knob.choices is not None:
        return Dimension(path, choices=tuple(knob.choices))
    step = int(knob.step) if knob.step else None
    return Dimension(path, low=int(knob.low), high=int(knob.high), log=knob.log, step=step)


def _default_dimension(path: str, config: TrainConfig, *, world_size: int) -> Dimension:
    glob = config.train_batch_size
    nvme = frozenset(block for block in ("offload_optimizer", "offload_param")
                     if getattr(config.zero_optimization, block).nvme_path)
    context = KnobContext(nvme_blocks=nvme, global_batch=None if glob is None or is_auto(glob) else glob,
                          dp=world_size)
    return Dimension(path, choices=candidates(path, context=context))


def _degree_dimension(config: TrainConfig, *, world_size: int, model: ModelSpec) -> Dimension | None:
    ranges = config.autotuning.space
    fixed = {k: _get(config, k) if k != "parallel.tp" else config.tp for k in _DEGREE_KNOBS}
    searched = [k for k in _DEGREE_KNOBS if k in ranges or is_auto(fixed[k])]
    if not searched:
        return None
    allowed = {k: _allowed_values(ranges.get(k)) for k in _DEGREE_KNOBS}
    combos = []
    for dp, tp, pp in degree_choices(world_size=world_size, model=model):
        for key, value in zip(_DEGREE_KNOBS, (dp, tp, pp)):
            given = fixed[key]
            if key not in searched and given is not None and given != value:
                break
            if key not in searched and given is None and key != "parallel.dp" and value != 1:
                break
            if allowed[key] is not None and value not in allowed[key]:
                break
        else:
            combos.append(f"{dp}.{tp}.{pp}")
    return Dimension(DEGREES, choices=tuple(combos)) if combos else None


def _allowed_values(knob: KnobRange | None) -> set[int] | None:
    if knob is None:
        return None
    if knob.choices is not None:
        return set(knob.choices)
    return set(range(int(knob.low), int(knob.high) + 1))


def _conditional(dim: Dimension) -> Dimension:
    knob = BY_KEY.get(dim.name)
    if knob is None or knob.only_if is None:
        return dim
    return Dimension(dim.name, dim.choices, dim.low, dim.high, dim.log, dim.step, only_if=knob.only_if)


def suggest(trial: TrialLike, dims: list[Dimension], *, config: TrainConfig) -> dict[str, Any]:
    """Values for one trial; a conditional dimension whose condition fails is left out."""
    params: dict[str, Any] = {}
    for dim in dims:
        if dim.only_if is not None:
            owner, wanted = dim.only_if
            current = params.get(owner, _get(config, owner))
            if current != wanted:
                continue
        if dim.choices is not None:
            params[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
        else:
            params[dim.name] = trial.suggest_int(dim.name, dim.low, dim.high, step=dim.step or 1, log=dim.log)
    return params


def apply(data: dict, params: dict[str, Any]) -> dict:
    """A copy of raw config data with the chosen values written in (degrees expanded)."""
    out = copy.deepcopy(data)
    for name, value in params.items():
        if name == DEGREES:
            dp, tp, pp = (int(v) for v in value.split("."))
            out.setdefault("parallel", {}).update({"dp": dp, "tp": tp, "pp": pp})
            out.get("tensor_parallel", {}).pop("autotp_size", None)
            continue
        set_path(out, name, value)
    if "zero_optimization.stage" in params and params["zero_optimization.stage"] != 3:
        offload_param = out.get("zero_optimization", {}).get("offload_param")
        if isinstance(offload_param, dict) and is_auto_like(offload_param.get("device")):
            offload_param["device"] = "none"
    return out


def is_auto_like(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"
