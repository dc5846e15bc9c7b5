"""`compile(config, model, cluster) -> Plan`: pure, deterministic, no torch.

Steps: reshape the cluster (`--nnodes`, `--nproc-per-node`); decide "auto" fields by rule
(autoresolve.py), then the performance ones by the cost-model search when asked to (else
refuse them), and record each decision in `provenance.resolved_auto`; build the Plan's sections (degrees, batch triple, defaults);
attach the memory, communication and step-time estimates.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from importlib import metadata

from zeroplan.schemas import ClusterSpec, ConfigError, ConfigWarning, ModelSpec, Plan, TrainConfig, validate_config
from zeroplan.schemas.plan import Provenance

from .autoresolve import apply_rules, auto_fields, set_path
from .calibration import Calibration
from .plan_builder import attach_estimates, build_plan
from .search import search


def config_hash(config: TrainConfig) -> str:
    """sha256 of the canonical config JSON: every field (defaults included), keys sorted."""
    data = config.model_dump(mode="json", exclude={"json_schema"})
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _version() -> str:
    try:
        return metadata.version("zeroplan")
    except metadata.PackageNotFoundError:
        return "unknown"


def resolve_autos(config: TrainConfig, model: ModelSpec, cluster: ClusterSpec, *, search_autos: bool = True,
                  calibration: Calibration | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """The config with every "auto" decided, and {dotted key: "value: why"}. Without
    `search_autos`, a performance "auto" (one the search decides) is a ConfigError."""
    data, searched, decided = apply_rules(config, model, cluster, search=search_autos)
    if searched:
        margin = config.autotuning.memory_safety_margin
        for key, (value, why) in search(data, searched, model, cluster, margin=margin, calibration=calibration).items():
            set_path(data, key, value)
            decided[key] = f"{json.dumps(value)}: {why}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # the user saw the notices when the config was loaded
        return validate_config(data, source="config with 'auto' resolved"), dict(sorted(decided.items()))


def compile(config: TrainConfig, model: ModelSpec, cluster: ClusterSpec, *, nnodes: int | None = None,
            nproc_per_node: int | None = None, resolve_auto: bool = False,
            calibration: Calibration | None = None) -> Plan:
    """The Plan for `config` on `cluster` (reshaped by `nnodes`/`nproc_per_node`).

    "auto" fields with a conventional value are decided by rule; without `resolve_auto`, a
    performance "auto" (degrees, stage, offload, micro-batch, ...) is a ConfigError listing all
    of them. Problems with degrees, batch or model fit are ConfigErrors naming the key to change.
    """
    cluster = cluster.with_shape(nnodes=nnodes, nproc_per_node=nproc_per_node)
    concrete, decided = (resolve_autos(config, model, cluster, search_autos=resolve_auto, calibration=calibration)
                         if auto_fields(config) else (config, {}))
    provenance = Provenance(config_hash=config_hash(config), zeroplan_version=_version(), model=model.name,
                            cluster=cluster.name, resolved_auto=decided)
    plan = build_plan(concrete, model, cluster, provenance=provenance)
    return attach_estimates(plan, model, cluster, calibration=calibration)
