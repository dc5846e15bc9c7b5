"""An Engine's checkpoints: what a rank saves, and a load that every rank verifies and agrees on.

Saving describes the rank's part in checkpoint_records' terms (its identity, its (tp, pp)
group's layout under the plain model's names, the run's degrees, step and optimizer) and hands
it to checkpoint.save. Loading, phases:
  1. every rank, without collectives: resolve the tag, open and verify the checkpoint, read
     its own shard, buffers and state for this run's layout, whatever layout saved it
     (checkpoint_source.py, reshard.py). Nothing in the engine changes yet;
  2. all ranks agree (agree.py: one all-reduce; the reasons gathered only on failure): if any
     rank failed, every rank raises the same CheckpointError naming each failing rank and why,
     so a `try: load / except: start fresh` takes the same branch everywhere;
  3. every rank installs what it read: master and optimizer state, buffers, the published
     parameters, scheduler, loss scaler, RNG, counters and the steps each parameter missed
     for want of a gradient (param_groups.py).
The scheduler, loss scaler, RNG and client state come from the state file of the rank with
this rank's number (rank 0's when the saving world was smaller).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zeroplan.schemas import Problem

from . import checkpoint
from .agree import Agreement, by_reason
from .checkpoint_records import GroupLayout, Identity, ParamRecord, SplitRecord, TensorRecord
from .checkpoint_source import MASTER, Checkpoint
from .parallel import tp_split_of
from .parallel.pipeline import PipelineStage
from .reshard import Reader
from .rng import get_rng_state, set_rng_state


@dataclass(frozen=True)
class Loaded:
    """What phase 1 read for one rank, not yet installed."""

    shard: dict[str, torch.Tensor]
    """`master` and `optim.<name>` tensors for MasterOptimizer.load_checkpoint_tensors."""
    module: dict[str, torch.Tensor]
    """Buffers and frozen parameters by their key (`module.<name>`)."""
    state: dict


def save(engine, *, directory: str | Path, tag: str, client_state: dict) -> Path:
    """The engine's checkpoint `tag` in `directory` (a collective)."""
    layout, local = describe(engine)
    identity = Identity(rank=engine.groups.rank, dp=engine.groups.dp_rank, tp=engine.groups.tp_rank,
                        pp=engine.groups.pp_rank, shard=engine.zero.rank)
    tensors = {**engine.optimizer.checkpoint_tensors(), **local}
    state = {"schedule": engine.schedule.state_dict(), "scaler": engine.scaler.state_dict(),
             "rng": get_rng_state(engine.device), "client_state": client_state,
             "counters": [engine.global_steps, engine.micro_steps, engine.skipped_steps],
             "missed_steps": engine.stepper.state_dict(names=_plain_names(engine)),
             "param_groups": engine._client.state_dict()}
    part = checkpoint.RankPart(identity=identity, tensors=tensors, state=state, layout=layout)
    return checkpoint.save(directory=directory, tag=tag, part=part, meta=_meta(engine),
                           agreement=Agreement(device=engine.device))


def load(engine, *, directory: str | Path, tag: str | None) -> dict:
    """Phases 1-3 of the module docstring; returns the client state."""
    loaded, error = None, None
    try:
        loaded = read(engine, checkpoint.resolve(directory, tag))
    except Exception as e:  # any rank's failure, a bug included, is every rank's error below
        error = e
    failures = Agreement(device=engine.device).failures(error)
    if failures:
        raise checkpoint.CheckpointError([Problem(ranks, reason) for ranks, reason in by_reason(failures)],
                                         source=f"checkpoint load from {directory}") from error
    _install(engine, loaded)
    return loaded.state["client_state"]


def read(engine, path: Path) -> Loaded:
    """This rank's part of the checkpoint at `path`, cut for the engine's layout and verified."""
    ckpt = Checkpoint(path)
    target, _ = describe(engine)
    optimizer = engine.optimizer.optimizer
    moments, counters = tuple(optimizer.state_names), tuple(optimizer.counters())
    reader = Reader(ckpt, prefer=engine.groups.rank)
    problems = reader.problems(target, moments=moments, counters=counters, whole=engine.groups.pp_size == 1)
    if problems:
        raise checkpoint.CheckpointError(problems, source=f"checkpoint {path}")
    shard, tp = engine.zero.rank, engine.groups.tp_rank
    tensors = {key: reader.shard(target, shard=shard, tp=tp, key=key)
               for key in (MASTER, *(f"optim.{m}" for m in moments))}
    tensors.update({f"optim.{c}": reader.counter(c) for c in counters})
    module = {t.key: reader.tensor(t, tp=tp) for t in target.tensors}
    state = ckpt.state(reader.prefer)
    refusal = engine._client.refusal(state["param_groups"]) if "param_groups" in state else None
    if refusal:
        raise checkpoint.CheckpointError(Problem("param_groups", refusal), source=f"checkpoint {path}")
    return Loaded(shard=tensors, module=module, state=state)


def _install(engine, loaded: Loaded) -> None:
    engine.optimizer.load_checkpoint_tensors(loaded.shard)
    _, local = describe(engine)
    for key, t in local.items():
        t.copy_(loaded.module[key])
    engine.zero.publish()
    engine.zero.zero_grad()
    state = loaded.state
    engine.schedule.load_state_dict(state["schedule"])
    engine.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], engine.device)
    engine.stepper.load_state_dict(state.get("missed_steps", {}), names=_plain_names(engine))  # none before them
    if "param_groups" in state:  # checkpoints before them held the plan's schedule only
        engine._client.load_state_dict(state["param_groups"])
    steps, _, skipped = state["counters"]
    # micro_steps counts this run's micro-batches: the saving run may have accumulated another number
    engine.global_steps, engine.micro_steps, engine.skipped_steps = steps, steps * engine.accumulation, skipped
    engine.window_micro_steps = 0


def _plain_names(engine) -> dict[str, str]:
    """A pipeline stage's parameter names -> the plain model's (the same names without pp)."""
    return engine.module.plain_names if isinstance(engine.module, PipelineStage) else {}


def describe(engine) -> tuple[GroupLayout, dict[str, torch.Tensor]]:
    """This rank's group layout under the plain model's names, and its buffers and frozen
    parameters by key (whole on every rank, outside the ZeRO shards)."""
    module, layout = engine.module, engine.zero.layout
    plain = _plain_names(engine)
    names: dict[int, list[str]] = {}
    first: dict[int, str] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(plain.get(name, name))
        first.setdefault(id(t), name)
        tensors[id(t)] = t
    params = tuple(ParamRecord(names=tuple(names.get(id(p), [slot.name])), shape=tuple(slot.shape), split=_split(p),
                               offset=slot.offset, chunk=slot.chunk)
                   for slot, p in zip(layout.slots, layout.params))
    records, local = [], {}
    for key, t in tensors.items():
        if layout.index_of(t) is None:
            value = t.data if isinstance(t, nn.Parameter) else t
            records.append(TensorRecord(key=f"module.{first[key]}", names=tuple(names[key]), shape=tuple(t.shape),
                                        dtype=str(t.dtype).removeprefix("torch."), split=_split(t)))
            local[records[-1].key] = value
    group = GroupLayout(tp=engine.groups.tp_rank, pp=engine.groups.pp_rank, shard_world=layout.world,
                        numel=layout.numel, params=params, tensors=tuple(records))
    return group, local


def _split(t: torch.Tensor) -> SplitRecord | None:
    split = tp_split_of(t)
    return None if split is None else SplitRecord(dim=split.dim, sizes=tuple(split.sizes), fused=split.fused)


def _meta(engine) -> dict:
    """Rank 0's record of the run (checkpoint_records.Meta, less the layouts and manifests)."""
    g, optimizer = engine.groups, engine.optimizer.optimizer
    return {"step": engine.global_steps,
            "world": {"world_size": g.world_size, "dp": g.dp_size, "tp": g.tp_size, "pp": g.pp_size,
                      "stage": engine.zero.stage, "order": list(g.topology.order)},
            "param_dtype": str(engine.param_dtype).removeprefix("torch."),
            "optimizer": {"moments": list(optimizer.state_names), "counters": list(optimizer.counters())},
            "model": _model_record(engine.module)}


def _model_record(module: nn.Module) -> dict:
    """The module's class, and a Hugging Face model's config (what from_pretrained needs)."""
    if isinstance(module, PipelineStage):
        return {"cls": None}
    config = getattr(module, "config", None)
    hf = None
    if callable(getattr(module, "save_pretrained", None)) and callable(getattr(config, "to_dict", None)):
        hf = json.loads(config.to_json_string(use_diff=False))
    return {"cls": f"{type(module).__module__}.{type(module).__qualname__}", "hf_config": hf}


__all__ = ["Loaded", "describe", "load", "read", "save"]
