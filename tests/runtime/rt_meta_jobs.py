"""Rank workers of the sharded-initialisation tests (test_meta_init.py): models built on the
meta device and materialised by `zeroplan.initialize`, against the same models built eagerly.
Run through rt_cases.run_jobs in one spawn."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import zeroplan
from rt_any_model import batch, config, hf_model
from zeroplan.schemas import ConfigError


def meta_model(kind: str) -> nn.Module:
    """`kind` built on the meta device after the same seed as the eager build (hf_model seeds)."""
    with torch.device("meta"):
        return hf_model(kind)


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


def start_up(engine, model: nn.Module, eager: nn.Module) -> dict:
    """What this rank holds right after initialize, in bytes and values: the engine's shards,
    the parameters' own storage, and whether this rank's shard is its chunk of the eager model."""
    zero = engine.zero
    layout = zero.layout
    rank = zero.rank
    named = dict(eager.named_parameters())
    want = torch.cat([layout.chunk_of(named[s.name].detach().reshape(-1).float(), s, rank) for s in layout.slots])
    master = zero.master if zero.master is not None else zero.param_store.read(0, layout.numel)
    buffers = dict(eager.named_buffers())
    return {"world": layout.world, "stage": zero.stage, "shard_numel": layout.numel,
            "chunks_numel": sum(-(-s.numel // layout.world) for s in layout.slots),
            "model_numel": sum(s.numel for s in layout.slots),
            "master_bytes": _storage_bytes([master]), "param_bytes": _storage_bytes(model.parameters()),
            "largest_param_bytes": max(s.numel for s in layout.slots) * 4,
            "shard_equal": torch.equal(master.float(), want) if zero.stage == 3 else None,
            "whole_equal": all(torch.equal(p.detach(), named[n].detach()) for n, p in model.named_parameters())
            if zero.stage < 3 else None,
            "buffers_equal": all(torch.equal(b, buffers[n]) for n, b in model.named_buffers()),
            "rng_equal": None}


def train_meta(*, case: dict) -> dict | None:
    """Build `case['model']` on meta, initialize it at `case['stage']`, record the start-up,
    train `case['steps']` steps; rank 0 returns the start-up records of both ranks and the fp32
    parameters. The eager twin is built after the meta one, so the generator is where an
    eager build leaves it: the replay must leave it there too."""
    rank = dist.get_rank()
    model = meta_model(case["model"])
    assert all(p.is_meta for p in model.parameters())
    engine = zeroplan.initialize(model, config=config(case))
    after_replay = torch.get_rng_state()
    eager = hf_model(case["model"])
    record = start_up(engine, model, eager)
    record["rng_equal"] = torch.equal(after_replay, torch.get_rng_state())
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    for step in range(case["steps"]):
        out = engine(**batch(case, step, rank))
        engine.backward(out.loss)
        engine.step()
    params = engine.full_state_dict()
    plan = engine.plan
    engine.close()
    return {"start_up": records, "params": params, "plan": plan,
            "model_source": plan.provenance.model_source} if rank == 0 else None


class Drawn(nn.Module):
    """Initialises `scale` in __init__ with no reset_parameters: nothing can replay it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return (self.lin(x) * self.scale).sum()


class Computed(nn.Module):
    """A buffer computed in __init__ (like rotary inv_freq) and no init that computes it again."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("freq", 1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4), persistent=False)

    def forward(self, x):
        return (self.lin(x) * self.freq.repeat(2)).sum()


class Recomputed(Computed):
    """The same with FSDP's convention: reset_parameters computes the buffer again."""

    def reset_parameters(self):
        self.freq.copy_(1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4))


def refusals(*, stage: int) -> dict | None:
    """What initialize says of meta models it cannot initialise, at `stage`; and that one
    whose own reset_parameters recomputes its buffer is materialised with the right buffer."""
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    out = {}
    for name, cls in (("drawn", Drawn), ("computed", Computed)):
        with torch.device("meta"):
            model = cls()
        try:
            zeroplan.initialize(model, config=cfg, model_spec="small")
            out[name] = "no error"
        except ConfigError as e:
            out[name] = [(p.path, p.message, p.suggestion) for p in e.problems]
    with torch.device("meta"):
        model = Recomputed()
    engine = zeroplan.initialize(model, config=cfg, model_spec="small")
    out["recomputed"] = torch.equal(model.freq, Computed().freq)
    engine.close()
    return out if dist.get_rank() == 0 else None
