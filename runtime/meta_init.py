"""Sharded initialisation: a model built on the meta device, materialised by `initialize`.

    with torch.device("meta"):
        model = LlamaForCausalLM(config)          # or AutoModelForCausalLM.from_config(config)
    engine = zeroplan.initialize(model, config=...)

Nothing is allocated at build. `initialize` replays the model's initialisation (meta_replay.py)
from rank 0's CPU generator state on every rank, touching one module's tensors at a time
(meta_lazy.py): at ZeRO-3 each rank keeps its shard of every partitioned parameter and drops
the rest as it goes (DeepSpeed's zero.Init keeps the same per-module peak); at stages 0-2
every rank keeps the whole model, as it holds it anyway. Values are made on the CPU, as an
eager CPU build makes them, then moved to the device.

What is guaranteed:
- the initial parameters and buffers are the same at every world size and ZeRO stage, on
  every rank (each rank draws the whole sequence; no rank's values depend on another's);
- they equal, bit for bit, what `torch.manual_seed(s); model = Model(...)` builds eagerly in
  one process when the same seed is set before `initialize` (or before the meta build: it draws
  nothing), for models whose modules initialise at construction only through
  `reset_parameters()` (every torch.nn layer), a Hugging Face model's `_init_weights`, or a class
  in meta_replay.CONSTRUCTION_INITS (transformers' Conv1D), and register their children in the
  order they build them: Hugging Face GPT-2 and Llama are tested. A module that draws in its
  `__init__` by other means gets the values its `reset_parameters` gives (its distribution,
  another draw), and shifts the draws of the modules after it;
- a parameter or buffer that no init step writes completely is a ConfigError naming it (a
  float tensor is NaN-filled before the replay, so a partial write is found too), never garbage.
  Buffers computed in `__init__` (rotary `inv_freq`, `position_ids`) are written again by their
  module's init (transformers' `_init_weights` covers both); a buffer of one's own needs a
  `reset_parameters` that computes it.
Afterwards every rank's CPU generator is where rank 0's eager build would have left it.

Not supported (ConfigError): tp or pp > 1 with a meta model (the tensor-parallel split and the
pipeline cut take whole parameters), and a model mixing meta and materialised parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from zeroplan.schemas import ConfigError, Plan, Problem

from .comm import Collectives
from .meta_lazy import LazyTensors
from .meta_replay import replay
from .zero.layout import ShardLayout


def meta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers on the meta device, by name (tied ones once)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: t for name, t in named if t.is_meta}


def check_meta_model(model: nn.Module, *, plan: Plan) -> None:
    """ConfigError for what sharded initialisation does not do (module docstring)."""
    problems = []
    for key in ("tp", "pp"):
        degree = getattr(plan.parallel, key)
        if degree > 1:
            problems.append(Problem(f"parallel.{key}", f"a model built on the meta device is materialised by zeroplan, "
                                    f"and {key}({degree}) > 1 needs whole parameters to split", given=degree,
                                    suggestion=f"build the model on the CPU for parallel.{key} > 1, or compile with "
                                    f"parallel.{key} 1"))
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    real = [n for n, p in model.named_parameters() if not p.is_meta]
    if real:
        on_meta = meta[0] if meta else next(iter(meta_tensors(model)))
        problems.append(Problem("model", f"some tensors are on the meta device ({on_meta!r}) and some parameters are "
                                f"not ({real[0]!r}, {len(real)} in all): replaying the model's initialisation would "
                                "overwrite the materialised ones", given=f"{len(meta)} meta, {len(real)} materialised",
                                suggestion="build every parameter on the meta device (`with torch.device('meta'):`), "
                                "or none"))
    if problems:
        raise ConfigError(problems)


def materialize_whole(model: nn.Module, *, coll: Collectives, device: torch.device) -> None:
    """Stages 0-2: every parameter and buffer whole on every rank, on `device`."""
    lazy = _replay(model, layout=None, rank=0, coll=coll, device=device, whole=set())
    for entry in lazy.watched.values():
        entry.tensor.data = entry.tensor.data.to(device)


def materialize_shard(model: nn.Module, *, coll: Collectives, device: torch.device, layout: ShardLayout, rank: int,
                      whole: set[int], param_dtype: torch.dtype) -> torch.Tensor:
    """ZeRO-3: this rank's fp32 shard of the initial values of `layout`'s parameters, on
    `device`. Slots in `whole` (persistent), frozen parameters and buffers are made whole on
    `device`; the other parameters hold a one-element placeholder of their shape in
    `param_dtype` (stage 3 releases them at once)."""
    lazy = _replay(model, layout=layout, rank=rank, coll=coll, device=device, whole=whole)
    for entry in lazy.watched.values():
        t = entry.tensor
        if entry.whole:
            t.data = t.data.to(device)
        else:
            t.data = torch.full((1,), float("nan"), dtype=param_dtype, device=device).expand(entry.slot.shape)
    return lazy.shard.to(device)


def _replay(model: nn.Module, *, layout: ShardLayout | None, rank: int, coll: Collectives, device: torch.device,
            whole: set[int]) -> LazyTensors:
    """Replay the model's init under LazyTensors from rank 0's generator state; buffers that
    were not on meta keep their values (rank 0's), on `device`."""
    kept = {name: b for name, b in model.named_buffers() if not b.is_meta}
    saved = {name: b.detach().clone() for name, b in kept.items()}
    state = torch.get_rng_state().to(device)
    coll.broadcast(state, src=0)
    torch.set_rng_state(state.cpu())
    lazy = LazyTensors(tensors=meta_tensors(model), layout=layout, rank=rank, coll=coll, device=device, whole=whole)
    with lazy:
        replay(model, settle=lazy.settle)
    _refuse_unwritten(model, lazy)
    with torch.no_grad():
        for name, b in kept.items():
            b.data = saved[name].to(device)
            coll.broadcast(b, src=0)
    return lazy


def _refuse_unwritten(model: nn.Module, lazy: LazyTensors) -> None:
    unwritten = lazy.unwritten()
    if not unwritten:
        return
    owners = dict(model.named_modules())
    problems = []
    for entry in unwritten:
        owner, _, _ = entry.name.rpartition(".")
        kind = type(owners.get(owner, model)).__name__
        what = "was never written" if entry.state == "fresh" else "was written only in part (NaN elements left)"
        problems.append(Problem(f"model.{entry.name}", f"{kind}'s tensor {entry.name!r} was built on the meta device "
                                f"and {what} by any init zeroplan replays (reset_parameters(), a Hugging Face "
                                "model's _init_weights)", given=tuple(entry.tensor.shape),
                                suggestion=f"give {kind} a reset_parameters() that initialises it (FSDP's "
                                "convention for meta-device models), or build the model on the CPU"))
    raise ConfigError(problems)
