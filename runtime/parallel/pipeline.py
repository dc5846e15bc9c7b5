"""Pipeline partitioning: a model as a sequence of layers, cut into pp stages.

A model can be pipelined when it says how its forward decomposes (the protocol DeepSpeed's
`PipelineModule` expresses with its `layers` and `loss_fn`):
    model.pipeline_layers() -> list[nn.Module]   each maps one tensor to the next
    model.pipeline_loss() -> loss_fn             loss_fn(output, labels) on the last stage; it must
                                                 not hold the model (each stage keeps only its layers)
    model.pipeline_checkpointable(layer) -> bool optional: the layers activation checkpointing
                                                 recomputes; by default those with parameters
                                                 (DeepSpeed's `_is_checkpointable`)
The built-in GPT implements it (embeddings, blocks, final norm + LM head); `PipelineModule`
wraps any `nn.Sequential` (or list of modules) with a loss function. A plain `nn.Sequential`
has no loss, so it is refused with a message that points at `PipelineModule`.

Partition methods (DeepSpeed's `partition_method`): `parameters` (default), `uniform` and
`type:<regex>` (e.g. `type:Block` for the GPT's transformer blocks), cut by the compiler's
torch-free arithmetic (compiler/partition.py), so a plan's stage estimates are this partition's;
this module only reads each layer's class name and trainable parameter count. A parameter used
by layers on two stages (the GPT's embedding, tied to its LM head) is kept on both; the engine
sums its gradients across them (Megatron's embedding group).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zeroplan.compiler.partition import partition_layers
from zeroplan.schemas import ConfigError, Problem

class PipelineModule(nn.Module):
    """Layers run in order, then `loss_fn(output, labels)`: a model any pp can split.

    `forward(inputs, labels=None)` is the plain single-process model (the loss when labels are
    given, else the output), so the same object trains with or without pipeline parallelism.
    """

    def __init__(self, *, layers: nn.Sequential | Sequence[nn.Module],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 checkpointable_layers: Sequence[str] | None = None):
        super().__init__()
        self.layers = layers if isinstance(layers, nn.Sequential) else nn.Sequential(*layers)
        self.loss_fn = loss_fn
        self.checkpointable_layers = checkpointable_layers
        """Class names of the layers activation checkpointing recomputes (DeepSpeed's argument);
        None: every layer with parameters."""

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.layers(inputs)
        return out if labels is None else self.loss_fn(out, labels)

    def pipeline_layers(self) -> list[nn.Module]:
        return list(self.layers)

    def pipeline_checkpointable(self, layer: nn.Module) -> bool:
        if self.checkpointable_layers is None:
            return _has_parameters(layer)
        return type(layer).__name__ in self.checkpointable_layers

    def pipeline_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self.loss_fn


# -- partition (the arithmetic is the compiler's, compiler/partition.py) ------------------------
def partition(layers: Sequence[nn.Module], *, stages: int, method: str) -> list[int]:
    """Stage boundaries [0, ..., len(layers)]: stage s runs layers [b[s], b[s + 1])."""
    return partition_layers(**_described(layers), stages=stages, method=method)


def _described(layers: Sequence[nn.Module]) -> dict[str, list]:
    """Each layer's class name and trainable parameter count: all the partition reads."""
    return {"names": [type(layer).__name__ for layer in layers],
            "params": [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]}


# -- the stage module --------------------------------------------------------------------------
@dataclass(frozen=True)
class TiedParameter:
    """A parameter that layers on several stages use (kept on each, gradients summed)."""

    local_name: str
    """Its name in this stage's module."""
    stages: tuple[int, ...]
    """The stages holding a copy; the first counts it in the gradient norm."""


class PipelineStage(nn.Module):
    """The consecutive layers of one stage, keyed by their index in the whole sequence."""

    def __init__(self, *, layers: dict[int, nn.Module], stage: int, stages: int, plain_names: dict[str, str],
                 tied: tuple[TiedParameter, ...], checkpointable: frozenset[int] = frozenset()):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): m for i, m in layers.items()})
        self.checkpointable = frozenset(str(i) for i in checkpointable)
        """Keys of the layers run through `checkpoint_fn` when it is set."""
        self.checkpoint_fn = None
        """Activation checkpointing's hook (runtime/checkpointing.py)."""
        self.stage, self.stages = stage, stages
        self.plain_names = plain_names
        """This module's state_dict names -> the plain model's state_dict names."""
        self.tied = tied

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for key, layer in self.layers.items():
            recompute = self.checkpoint_fn is not None and key in self.checkpointable
            x = self.checkpoint_fn(layer, x) if recompute else layer(x)
        return x


def model_layers(model: nn.Module) -> tuple[list[nn.Module], Callable]:
    """(layers, loss) of a model that implements the pipeline protocol; ConfigError otherwise."""
    if not (hasattr(model, "pipeline_layers") and hasattr(model, "pipeline_loss")):
        hint = ("wrap it as zeroplan.runtime.parallel.PipelineModule(layers=..., loss_fn=...)"
                if isinstance(model, nn.Sequential) else
                "give the model pipeline_layers() and pipeline_loss(), or build it as a "
                "zeroplan.runtime.parallel.PipelineModule")
        raise ConfigError(Problem("parallel.pp", f"pp > 1 needs the model as a sequence of layers and a loss, "
                                  f"and {type(model).__name__} does not say how it splits", suggestion=hint))
    layers = list(model.pipeline_layers())
    bad = [type(m).__name__ for m in layers if not isinstance(m, nn.Module)]
    if bad:
        raise TypeError(f"pipeline_layers() must return nn.Module objects, got {', '.join(bad)}")
    return layers, model.pipeline_loss()


def _stage_users(layers: list[nn.Module], bounds: list[int]) -> dict[int, set[int]]:
    """id(parameter) -> the stages whose layers use it."""
    users: dict[int, set[int]] = {}
    for s in range(len(bounds) - 1):
        for layer in layers[bounds[s]:bounds[s + 1]]:
            for p in layer.parameters():
                users.setdefault(id(p), set()).add(s)
    return users


def split_model(model: nn.Module, *, stage: int, stages: int, method: str) -> tuple[PipelineStage, Callable]:
    """This stage's part of `model` (its layers, the same module objects, and name mappings) and the loss."""
    layers, loss_fn = model_layers(model)
    bounds = partition(layers, stages=stages, method=method)
    users = _stage_users(layers, bounds)
    mine = {i: layers[i] for i in range(bounds[stage], bounds[stage + 1])}
    module_paths: dict[int, str] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        module_paths.setdefault(id(m), path)
    plain, tied = {}, []
    for i, layer in mine.items():
        for local, t in layer.state_dict(keep_vars=True).items():
            name = f"layers.{i}.{local}"
            plain[name] = _plain_name(module_paths, layer, local, default=name)
            if isinstance(t, nn.Parameter) and len(users.get(id(t), ())) > 1:
                tied.append(TiedParameter(local_name=name, stages=tuple(sorted(users[id(t)]))))
    checkpointable = getattr(model, "pipeline_checkpointable", _has_parameters)
    return PipelineStage(layers=mine, stage=stage, stages=stages, plain_names=plain, tied=_unique(tied),
                         checkpointable=frozenset(i for i, layer in mine.items() if checkpointable(layer))), loss_fn


def _has_parameters(layer: nn.Module) -> bool:
    return any(True for _ in layer.parameters())


def _plain_name(module_paths: dict[int, str], layer: nn.Module, local: str, *, default: str) -> str:
    """The plain model's name of a layer's tensor: the path of the module that owns it there."""
    owner, _, leaf = local.rpartition(".")
    path = module_paths.get(id(layer.get_submodule(owner)))
    if path is None:  # a wrapper's own tensor, not in the plain model's tree
        return default
    return f"{path}.{leaf}" if path else leaf


def tied_stage_sets(model: nn.Module, *, stages: int, method: str) -> list[tuple[int, ...]]:
    """Every distinct set of stages sharing a parameter, sorted (the same list on every rank)."""
    layers, _ = model_layers(model)
    users = _stage_users(layers, partition(layers, stages=stages, method=method))
    return sorted({tuple(sorted(u)) for u in users.values() if len(u) > 1})


def _unique(tied: list[TiedParameter]) -> tuple[TiedParameter, ...]:
    seen, out = set(), []
    for t in tied:
        if t.local_name not in seen:
            seen.add(t.local_name)
            out.append(t)
    return tuple(out)
