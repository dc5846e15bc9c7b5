"""`initialize(model, config=...)`: compile an all-concrete config into a Plan in-process.

The compiler needs the model's shape (for its estimates and the tp/pp checks) and the
machines (for memory limits and rates). The shape is, in order: `model_spec=` (a preset name,
a JSON file or a ModelSpec), the model's own `spec` (the built-in GPT), read from its Hugging
Face config (model_shape.py), or measured from its module tree (user_model.measure_spec). An
inferred shape is recorded in the plan's `provenance.model_source`, with a warning that the
estimates are approximate. The cluster defaults to the `cpu` preset on a CPU and must be named
on an accelerator (a preset such as `h100-80`, or `zeroplan probe`'s cluster.json), since
guessing it would make the plan's estimates fiction. The world comes from the torchrun
environment (one process without it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from zeroplan.compiler import compile as compile_plan
from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Plan, Problem, load_config

from .client_optim import ClientOptimizer
from .model_shape import describe, spec_from_hf_config
from .user_model import measure_spec


def infer_spec(model: nn.Module) -> tuple[ModelSpec, str]:
    """The model's shape and, when it was inferred, from what ("" for the model's own spec)."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec, ""
    spec = spec_from_hf_config(model)
    if spec is not None:
        return spec, describe(spec, model=model, source=f"read from its Hugging Face config "
                                                      f"({type(model.config).__name__})")
    spec = measure_spec(model, sample=None, name=type(model).__name__)
    return spec, describe(spec, model=model, source="measured from its module tree (a GPT of its depth, width "
                                                    "and parameter count)")


def _model_spec(model: nn.Module, given: ModelSpec | str | Path | None) -> tuple[ModelSpec, str]:
    if isinstance(given, ModelSpec):
        return given, ""
    if given is not None:
        return ModelSpec.load(given), ""
    return infer_spec(model)


def _cluster(given: ClusterSpec | str | Path | None) -> ClusterSpec:
    if isinstance(given, ClusterSpec):
        return given
    if given is not None:
        return ClusterSpec.load(given)
    if torch.cuda.is_available():
        raise ConfigError(Problem("cluster", "on an accelerator the cluster must be named",
                                  suggestion="pass cluster= (e.g. 'h100-80', or cluster.json from `zeroplan probe`)"))
    return ClusterSpec.load("cpu")


def plan_from_config(config: str | Path | Mapping[str, Any], *, model: nn.Module,
                     model_spec: ModelSpec | str | Path | None = None,
                     cluster: ClusterSpec | str | Path | None = None,
                     client: ClientOptimizer | None = None) -> Plan:
    """The Plan for `config` on this launch's world (WORLD_SIZE / LOCAL_WORLD_SIZE from torchrun);
    `client` completes the config's optimizer block from an optimizer instance (client_optim.py)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % per_node:
        raise ConfigError(Problem("WORLD_SIZE", f"WORLD_SIZE({world}) is not a multiple of "
                                  f"LOCAL_WORLD_SIZE({per_node})", suggestion="launch with torchrun"))
    cfg = load_config(config, world_size=world)
    if client is not None:
        cfg = client.complete_config(cfg)
    spec, source = _model_spec(model, model_spec)
    plan = compile_plan(cfg, spec, _cluster(cluster), nnodes=world // per_node, nproc_per_node=per_node)
    return _mark_inferred(plan, source) if source else plan


def _mark_inferred(plan: Plan, source: str) -> Plan:
    """The plan with where its model shape came from, and a warning that its estimates follow it."""
    provenance = plan.provenance.model_copy(update={"model_source": source})
    warnings = (*plan.estimates.warnings, f"model shape {source}; the estimates are approximate")
    return plan.model_copy(update={"provenance": provenance,
                                   "estimates": plan.estimates.model_copy(update={"warnings": warnings})})
