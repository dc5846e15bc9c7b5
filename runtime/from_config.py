"""`initialize(model, config=...)`: compile an all-concrete config into a Plan in-process.

The compiler needs the model's shape (for its estimates and the tp/pp checks) and the
machines (for memory limits and rates). The built-in GPT carries its `ModelSpec`; any other
model passes `model_spec=` (a preset name, a JSON file or a ModelSpec). The cluster defaults
to the `cpu` preset on a CPU and must be named on an accelerator (a preset such as
`h100-80`, or `zeroplan probe`'s cluster.json), since guessing it would make the plan's
estimates fiction. The world comes from the torchrun environment (one process without it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from zeroplan.compiler import compile as compile_plan
from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Plan, Problem, load_config


def _model_spec(model: nn.Module, given: ModelSpec | str | Path | None) -> ModelSpec:
    if isinstance(given, ModelSpec):
        return given
    if given is not None:
        return ModelSpec.load(given)
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    raise ConfigError(Problem("model_spec", "initialize(config=...) needs the model's shape for the plan",
                              suggestion="pass model_spec= (a preset name, a ModelSpec or its JSON file), or "
                                         "compile a plan with `zeroplan compile` and pass plan="))


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
                     cluster: ClusterSpec | str | Path | None = None) -> Plan:
    """The Plan for `config` on this launch's world (WORLD_SIZE / LOCAL_WORLD_SIZE from torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % per_node:
        raise ConfigError(Problem("WORLD_SIZE", f"WORLD_SIZE({world}) is not a multiple of "
                                  f"LOCAL_WORLD_SIZE({per_node})", suggestion="launch with torchrun"))
    cfg = load_config(config, world_size=world)
    return compile_plan(cfg, _model_spec(model, model_spec), _cluster(cluster), nnodes=world // per_node,
                        nproc_per_node=per_node)
