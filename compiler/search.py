"""Cost-model search over the performance "auto" fields (`compile(..., resolve_auto=True)`).

Every combination of the searched knobs is compiled; a candidate fits when the memory model's
per-rank total stays under (1 - autotuning.memory_safety_margin) of the rank's memory and host
and NVMe fit; among those the highest predicted samples/s wins (ties: fewer device bytes, then
enumeration order, so the result is deterministic). The batch keys follow DeepSpeed's
derivation: an "auto" global batch or accumulation count is derived from the others.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass
from typing import Any

from zeroplan.schemas import ClusterSpec, ConfigError, ConfigWarning, ModelSpec, Plan, Problem, validate_config
from zeroplan.schemas.knobs import BY_KEY, DEGREE_KEYS, KNOBS, KnobContext, candidates, conflict
from zeroplan.schemas.plan import Provenance
from zeroplan.schemas.cluster import GiB

from .autoresolve import get_path, set_path
from .calibration import Calibration
from .cost import step_time
from .degrees import degree_choices
from .memory import estimate_memory
from .plan_builder import build_plan, fit_warnings

MAX_CANDIDATES = 5_000
"""More combinations than this is a search for `zeroplan autotune`, not for compile (each
candidate is a full compile, about 2 ms)."""


@dataclass(frozen=True)
class EstimatedCandidate:
    """One combination of `compile`'s own search over "auto" fields, judged by the estimates
    alone (nothing is run): its values, plan, predicted device memory and throughput."""

    values: dict[str, Any]
    plan: Plan
    device_bytes: int
    samples_per_s: float
    fits: bool


def _degree_options(data: dict, autos: list[str], model: ModelSpec, cluster: ClusterSpec) -> list[dict[str, Any]]:
    """The valid (dp, tp, pp) of the world (degrees.py's rule) that keep the given degrees; a
    searched tp stays within a node. dp is derived unless given."""
    world = cluster.world_size
    tp_key = "tensor_parallel.autotp_size" if "tensor_parallel.autotp_size" in autos else "parallel.tp"
    searched = {"tp": tp_key in autos, "pp": "parallel.pp" in autos}
    given = {"dp": get_path(data, "parallel.dp"), "tp": get_path(data, tp_key) or 1,
             "pp": get_path(data, "parallel.pp") or 1}
    options = []
    for dp, tp, pp in degree_choices(world_size=world, model=model,
                                     tp_max=cluster.nproc_per_node if searched["tp"] else None):
        chosen = {"dp": dp, "tp": tp, "pp": pp}
        if any(not searched.get(k) and isinstance(given[k], int) and given[k] != v for k, v in chosen.items()):
            continue
        option = {"parallel.dp": None} if "parallel.dp" in autos else {}
        if searched["tp"]:
            option[tp_key] = tp
        if searched["pp"]:
            option["parallel.pp"] = pp
        options.append(option)
    if not options:
        fixed = ", ".join(f"{k}({v})" for k, v in given.items() if isinstance(v, int) and not searched.get(k))
        raise ConfigError(Problem(next(k for k in autos if k in DEGREE_KEYS),
                                  f"no dp x tp x pp = world_size({world}) with {fixed} splits model {model.name} "
                                  "(tp must divide its heads, hidden and ffn; pp at most its layers)",
                                  suggestion="change the given degrees or the process count"))
    return options


def _knob_options(data: dict, autos: list[str], model: ModelSpec, cluster: ClusterSpec) -> list[list[dict]]:
    """Per searched knob, its options as partial updates of the config data: the degrees
    jointly, the batch keys DeepSpeed derives as None, the others their candidates (schemas/knobs.py)."""
    knobs: list[list[dict]] = []
    if any(k in autos for k in DEGREE_KEYS):
        knobs.append(_degree_options(data, autos, model, cluster))
    glob = get_path(data, "train_batch_size")
    context = KnobContext(nvme_blocks=frozenset(b for b in ("offload_optimizer", "offload_param")
                                                if get_path(data, f"zero_optimization.{b}.nvme_path")),
                          global_batch=glob if isinstance(glob, int) else None)
    derived = {k: None for k in autos if BY_KEY[k].compile == "derived"}
    batch_fixed = all(isinstance(get_path(data, k), int) for k in ("train_batch_size", "gradient_accumulation_steps"))
    for knob in KNOBS:
        if knob.key not in autos or knob.degree or knob.compile != "search":
            continue
        if knob.key == "train_micro_batch_size_per_gpu" and batch_fixed:
            derived[knob.key] = None  # the global batch and accumulation fix it
            continue
        knobs.append([{knob.key: v} for v in candidates(knob.key, context=context)])
    if derived:
        knobs.append([derived])
    return knobs


def _plausible(values: dict[str, Any], data: dict) -> bool:
    """Skip combinations the schema refuses anyway (schemas/knobs.py's `conflict`)."""
    keys = ("zero_optimization.stage", "zero_optimization.offload_param.device",
            "zero_optimization.offload_optimizer.device")
    merged = {k: values[k] if k in values else get_path(data, k) for k in keys}
    return conflict({k: v for k, v in merged.items() if v != {}}) is None


def _evaluate(data: dict, values: dict, model: ModelSpec, cluster: ClusterSpec, *, margin: float,
              calibration: Calibration | None) -> EstimatedCandidate:
    trial = copy.deepcopy(data)
    for key, value in values.items():
        set_path(trial, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        config = validate_config(trial, source="candidate")
    plan = build_plan(config, model, cluster, provenance=Provenance())
    memory = estimate_memory(plan, model, calibration=calibration,
                             measured_overhead=cluster.runtime_overhead_bytes)
    seconds = sum(step_time(plan, model, cluster).values())
    fits = (memory.device_total <= (1 - margin) * cluster.memory_per_rank()
            and not fit_warnings(memory, cluster=cluster))
    return EstimatedCandidate(values=values, plan=plan, device_bytes=memory.device_total,
                     samples_per_s=plan.batch.global_batch_size / seconds, fits=fits)


def _describe(best: EstimatedCandidate, *, fitting: int, total: int, limit: int) -> str:
    return (f"fastest of {fitting} fitting candidates ({total} compiled): {best.samples_per_s:.4g} samples/s "
            f"predicted, {best.device_bytes / GiB:.2f} of {limit / GiB:.2f} GiB per rank")


def _decisions(best: EstimatedCandidate, autos: list[str], *, fitting: int, total: int,
               limit: int) -> dict[str, Any]:
    """The chosen concrete value of every searched key, and why."""
    plan = best.plan
    concrete = {
        "parallel.dp": plan.parallel.dp, "parallel.tp": plan.parallel.tp,
        "tensor_parallel.autotp_size": plan.parallel.tp, "parallel.pp": plan.parallel.pp,
        "train_batch_size": plan.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.batch.micro_batch_size,
        "gradient_accumulation_steps": plan.batch.gradient_accumulation_steps,
    }
    why = _describe(best, fitting=fitting, total=total, limit=limit)
    out = {}
    for key in autos:
        value = best.values[key] if best.values.get(key) is not None else concrete.get(key)
        searched = key in best.values and best.values[key] is not None
        out[key] = (value, why if searched else "derived from the chosen values (" + why + ")")
    return out


def search(data: dict, autos: list[str], model: ModelSpec, cluster: ClusterSpec, *, margin: float,
           calibration: Calibration | None = None) -> dict[str, tuple[Any, str]]:
    """Concrete values for the searched "auto" keys: {key: (value, why)}; ConfigError when none fits."""
    knobs = _knob_options(data, autos, model, cluster)
    combos = [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*knobs)]
    combos = [c for c in combos if _plausible(c, data)]
    if len(combos) > MAX_CANDIDATES:
        raise ConfigError(Problem(autos[0], f"{len(combos)} combinations of {', '.join(autos)} is too many to "
                                  f"compile (limit {MAX_CANDIDATES})", suggestion="give some of them, or run "
                                  "`zeroplan autotune`"))
    candidates, refused = [], []
    for values in combos:
        try:
            candidates.append(_evaluate(data, values, model, cluster, margin=margin, calibration=calibration))
        except ConfigError as e:
            refused.append(e)
    limit = cluster.memory_per_rank()
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise ConfigError(_nothing_fits(autos, candidates, refused, limit=limit))
    best = max(fitting, key=lambda c: (c.samples_per_s, -c.device_bytes))
    return _decisions(best, autos, fitting=len(fitting), total=len(candidates), limit=limit)


def _nothing_fits(autos: list[str], candidates: list[EstimatedCandidate], refused: list[ConfigError], *,
                  limit: int) -> list[Problem]:
    keys = ", ".join(autos)
    if not candidates:
        first = refused[0].problems if refused else []
        return [Problem(autos[0], f"no choice of {keys} gives a valid plan; the first refused for:"), *first]
    smallest = min(candidates, key=lambda c: c.device_bytes)
    return [Problem(autos[0], f"no choice of {keys} fits: the smallest of {len(candidates)} candidates needs "
                    f"{smallest.device_bytes / GiB:.2f} GiB per rank, {limit / GiB:.2f} GiB available",
                    suggestion="use more ranks, offload to nvme, or compile concrete values to read the breakdown")]
