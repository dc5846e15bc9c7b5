"""The initialisation an eager build runs, in the order it runs it, for a model built on meta.

A model built eagerly under a seed draws its initial values from the CPU generator in
construction order. On the meta device nothing is drawn, so replaying the same init calls in
the same order, from the same generator state, draws the same values. The order, for a module:

  1. its children, in registration order (the order `__init__` built them in);
  2. its construction-time init: `reset_parameters()` (every torch.nn layer calls it at the end
     of its `__init__`; MultiheadAttention and Transformer call `_reset_parameters()`), the
     entry of `CONSTRUCTION_INITS` for a known class that initialises inline (transformers'
     Conv1D: `nn.init.normal_(weight, std=0.02)`), or a `reset_parameters()` of the user's own
     module (FSDP's convention for meta-device models);
  3. for a Hugging Face PreTrainedModel, its `initialize_weights()`, as `post_init()` runs it at
     the end of that model's `__init__`: `_init_weights` on every module below it not already
     initialised (a nested PreTrainedModel did its own subtree at the end of its own build).

A parameter shared by several modules (tied weights) is initialised by its first owner in
module order; another owner's step writes a scratch tensor instead (its draws are made and
discarded), as when a model builds both modules and ties them afterwards (transformers'
`tie_weights` points the output embedding at the input one after `post_init`'s init).

`settle` is called after every step (one module's init), so that only the tensors of one step
are whole at a time (meta_lazy.py). The replay equals the eager build exactly when the model's
modules initialise their parameters at construction only through these calls and register
their children in the order they build them; see meta_init.py for what is guaranteed.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
from torch import nn


def _conv1d(module: nn.Module) -> None:
    nn.init.normal_(module.weight, std=0.02)
    nn.init.zeros_(module.bias)


CONSTRUCTION_INITS: dict[str, Callable[[nn.Module], None]] = {
    "transformers.pytorch_utils.Conv1D": _conv1d,
}
"""Classes (module.qualname) whose `__init__` initialises parameters inline, without a
`reset_parameters`: what their `__init__` does to them, in its order."""


def construction_init(module: nn.Module) -> Callable[[], None] | None:
    """What `module`'s own `__init__` ran to initialise its parameters and buffers, or None."""
    cls = type(module)
    known = CONSTRUCTION_INITS.get(f"{cls.__module__}.{cls.__qualname__}")
    if known is not None:
        return lambda: known(module)
    reset = getattr(module, "reset_parameters", None)
    if cls.__module__.startswith("torch.nn.") and not callable(reset):
        reset = getattr(module, "_reset_parameters", None)  # MultiheadAttention, Transformer
    return reset if callable(reset) else None


def _pretrained(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a model of that class means it is imported
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


@contextlib.contextmanager
def _untied(module: nn.Module, owner: dict[int, nn.Module]) -> Iterator[None]:
    """`module`'s parameters owned by an earlier module replaced by scratch tensors for one step."""
    shared = {k: p for k, p in module._parameters.items() if p is not None and owner.get(id(p), module) is not module}
    for k, p in shared.items():
        module._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
    try:
        yield
    finally:
        module._parameters.update(shared)


def _hf_initialize(model: nn.Module, settle: Callable[[], None], owner: dict[int, nn.Module]) -> None:
    """`model.initialize_weights()` with `settle` after each module's `_init_weights`: each
    PreTrainedModel below gets an instance attribute wrapping its `_initialize_weights`, which
    transformers' traversal (smart_apply) looks up per sub-model."""
    wrapped = []
    for sub in model.modules():
        if _pretrained(sub) and "_initialize_weights" not in sub.__dict__:
            original = sub._initialize_weights

            def step(module, *args, _original=original, **kwargs):
                with _untied(module, owner):
                    _original(module, *args, **kwargs)
                settle()

            sub.__dict__["_initialize_weights"] = step
            wrapped.append(sub)
    try:
        initialize = getattr(model, "initialize_weights", None) or model.init_weights
        initialize()
    finally:
        for sub in wrapped:
            del sub.__dict__["_initialize_weights"]


def replay(model: nn.Module, *, settle: Callable[[], None]) -> None:
    """Run `model`'s eager initialisation (module docstring), `settle` after each step."""
    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    with torch.no_grad():
        _visit(model, seen=set(), owner=owner, settle=settle)


def _visit(module: nn.Module, *, seen: set[int], owner: dict[int, nn.Module], settle: Callable[[], None]) -> None:
    """One module of the replay, its children first. A function of the module level, not a
    closure: a recursive closure is a reference cycle, which would keep `settle`'s owner (and
    the shard it holds) alive until the garbage collector runs."""
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        _visit(child, seen=seen, owner=owner, settle=settle)
    init = construction_init(module)
    if init is not None:
        with _untied(module, owner):
            init()
        settle()
    if _pretrained(module):
        _hf_initialize(module, settle, owner)
