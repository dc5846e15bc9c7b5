"""Rank workers and single-process references of the tensor-parallel tests (run through
`run_tp_jobs` in one spawn per world size)."""

from __future__ import annotations

import shutil
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zeroplan.runtime import initialize
from zeroplan.runtime.comm import CommsLogger
from zeroplan.runtime.parallel import Colwise, Rowwise, VocabParallelCrossEntropy, tp_collectives, tp_split_of
from zeroplan.runtime.parallel.tensor_comm import piece, split_sizes
from zeroplan.runtime.schedulers import build_schedule
from zeroplan.schemas import Plan
from zeroplan.schemas.plan import ParallelPlan, WorldPlan

from rt_cases import GLOBAL_BATCH, build, micro_batch
from rt_plans import make_plan

STEPS = 4
"""AdamW steps per case; clipping (max norm 0.5) triggers at every one of them."""


class TinyLM(nn.Module):
    """A user model split by a plan of its own: a vocab embedding, a row layer fed a replicated
    input (scatter), an MLP pair, and a column head whose output is gathered."""

    def __init__(self, vocab: int = 13, width: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 24)
        self.down = nn.Linear(24, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids, labels):
        h = self.emb(ids)
        h = h + torch.tanh(self.mix(h))
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        logits = self.head(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


TINY_PLAN = {"emb": "vocab", "mix": Rowwise(input_is_parallel=False), "up": "colwise", "down": "rowwise",
             "head": Colwise(gather_output=True)}


def tiny_batch(step: int, lo: int, n: int) -> dict:
    g = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, 13, (GLOBAL_BATCH, 6), generator=g)
    labels = torch.randint(0, 13, (GLOBAL_BATCH, 6), generator=g)
    return {"ids": ids[lo:lo + n], "labels": labels[lo:lo + n]}


def build_model(kind: str) -> nn.Module:
    if kind == "tiny":
        torch.manual_seed(4321)
        return TinyLM()
    return build(kind)


def batch_of(case: dict, step: int, dp_rank: int, k: int) -> dict:
    if case["model"] == "tiny":
        micro = GLOBAL_BATCH // (case["dp"] * case["accum"])
        return tiny_batch(step, (k * case["dp"] + dp_rank) * micro, micro)
    return micro_batch(dict(case, world=case["dp"]), step, dp_rank, k)


def tp_plan(case: dict) -> Plan:
    dp, tp, accum = case["dp"], case["tp"], case["accum"]
    base = make_plan(stage=case["stage"], world=dp, accum=accum, micro=GLOBAL_BATCH // (dp * accum),
                     dtype=case.get("dtype", "fp32"), checkpointing=case.get("checkpointing"))
    data = base.model_dump()
    data["world"] = WorldPlan(nnodes=1, nproc_per_node=dp * tp, world_size=dp * tp).model_dump()
    data["parallel"] = ParallelPlan(dp=dp, tp=tp, sequence_parallel=case.get("sp", False)).model_dump()
    del data["layout"]  # the plan derives it anew from this world and these degrees
    return Plan.model_validate(data)


# -- rank workers -------------------------------------------------------------------------------
def _train(engine, case: dict, steps: range) -> tuple[list[float], list[float], list[int]]:
    losses, norms, tokens = [], [], []
    dp_rank = engine.groups.dp_rank
    for step in steps:
        for k in range(case["accum"]):
            loss = engine(**batch_of(case, step, dp_rank, k))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        norms.append(engine.last_grad_norm)
        tokens.append(engine.meter.last_tokens)
    return losses, norms, tokens


def _engine(case: dict):
    kwargs = {"tp_plan": TINY_PLAN} if case["model"] == "tiny" else {}
    return initialize(build_model(case["model"]), plan=tp_plan(case), **kwargs)


def train_tp(*, case: dict) -> dict | None:
    """Train STEPS steps; rank 0 returns the consolidated state dict, norms, tokens and comms."""
    engine = _engine(case)
    losses, norms, tokens = _train(engine, case, range(STEPS))
    comms = engine.last_comms
    full = engine.full_state_dict()
    local_shapes = {n: tuple(p.shape) for n, p in engine.module.named_parameters()}
    engine.close()
    if dist.get_rank():
        return None
    return {"params": full, "losses": losses, "norms": norms, "tokens": tokens, "comms": comms,
            "local_shapes": local_shapes, "recomputed": engine.checkpointing.calls}


def checkpoint_tp(*, case: dict) -> dict | None:
    """2 steps, save, 2 more; a fresh engine loads at step 2 and runs the same 2: equal states.
    An engine with tp = 1 (dp = world) loads the dp x tp checkpoint too (a reshard)."""
    directory = _shared_tempdir()
    first = _engine(case)
    _train(first, case, range(2))
    first.save_checkpoint(directory)
    saved = first.full_state_dict()
    _train(first, case, range(2, 4))
    want = first.full_state_dict()
    first.close()
    torch.manual_seed(77)
    second = _engine(case)
    second.load_checkpoint(directory)
    _train(second, case, range(second.global_steps, 4))
    got = second.full_state_dict()
    second.close()
    resharded = _load_without_tp(case, directory)
    dist.barrier()
    if dist.get_rank():
        return None
    shutil.rmtree(directory)
    return {"diff": max((got[k] - want[k]).abs().max().item() for k in want),
            "resharded_diff": max((resharded[k] - saved[k]).abs().max().item() for k in saved)}


def _load_without_tp(case: dict, directory: str) -> dict:
    """The dp x tp checkpoint loaded into a run with tp = 1 and dp = world: the whole model."""
    engine = _engine(dict(case, dp=case["dp"] * case["tp"], tp=1))
    engine.load_checkpoint(directory)
    full = engine.full_state_dict()
    engine.close()
    return full


def _shared_tempdir() -> str:
    """One temporary directory, named by rank 0, for every rank."""
    name = [tempfile.mkdtemp(prefix="zeroplan-tp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def replicated_grads(*, case: dict) -> dict | None:
    """After one backward (stage 0, dp = 1), the tp-replicated gradients are bitwise equal on
    every tp rank; the split ones differ."""
    engine = _engine(case)
    loss = engine(**batch_of(case, 0, engine.groups.dp_rank, 0))
    engine.backward(loss)
    same, differ = [], []
    for slot, p in zip(engine.zero.layout.slots, engine.zero.layout.params):
        mine = engine.zero.grad[slot.offset:slot.offset + slot.chunk].clone()
        if tp_split_of(p) is not None:
            mine = mine[:16]  # slices may differ in size (the vocabulary's 49 + 48 rows)
        first = mine.clone()
        engine.tp_coll.broadcast(first, src=0)
        (differ if tp_split_of(p) is not None else same).append((slot.name, bool(torch.equal(mine, first))))
    engine.close()
    seen = [{"replicated": same, "split": differ}]  # as tp rank 1 sees it (rank 0 compares with itself)
    dist.broadcast_object_list(seen, src=1)
    return seen[0] if dist.get_rank() == 0 else None


def vocab_cross_entropy(*, vocab: int = 97) -> dict | None:
    """The vocab-parallel loss and its logits' gradient equal F.cross_entropy's, ignore_index
    included: per reduction, the loss's largest relative difference (the losses of these large
    logits reach 1e2, their sum 1e3, where one fp32 ulp is already 1e-4) and the gradient's
    largest absolute one (softmax gradients lie in [-1, 1])."""
    tp = dist.get_world_size()
    coll = tp_collectives(group=dist.group.WORLD, logger=CommsLogger())
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(40, vocab, generator=g) * 30).requires_grad_(True)  # large: stability matters
    target = torch.randint(0, vocab, (40,), generator=g)
    target[::7] = -100
    start, end = piece(split_sizes(vocab, tp), dist.get_rank())
    out = {}
    for reduction in ("mean", "sum", "none"):
        local = logits.detach()[:, start:end].clone().requires_grad_(True)
        loss = VocabParallelCrossEntropy(coll=coll, vocab_start=start, reduction=reduction)(local, target)
        loss.sum().backward()
        want = F.cross_entropy(logits, target, reduction=reduction)
        logits.grad = None
        want.sum().backward()
        loss_rel = ((loss - want).abs() / want.abs().clamp_min(1.0)).max().item()
        out[reduction] = (loss_rel, (local.grad - logits.grad[:, start:end]).abs().max().item())
    coll.close()
    return out if dist.get_rank() == 0 else None


def bad_plans() -> dict | None:
    """Plan mistakes reported as ConfigError naming the pattern (every rank raises alike)."""
    from zeroplan.schemas import ConfigError

    case = {"model": "tiny", "stage": 0, "dp": 1, "tp": dist.get_world_size(), "accum": 1}
    out = {}
    for label, plan in (("typo", {**TINY_PLAN, "donw": "rowwise"}), ("style", {"up": "diagonal"}),
                        ("type", {"norm": "colwise"}), ("overlap", {"up": "colwise", "u*": "rowwise"})):
        try:
            initialize(build_model("tiny"), plan=tp_plan(case), tp_plan=plan).close()
            out[label] = "accepted"
        except ConfigError as e:
            out[label] = str(e)
    return out if dist.get_rank() == 0 else None


def sequence_parallel_refusals() -> dict | None:
    """Sequence parallelism refused with a ConfigError naming parallel.sequence_parallel (every rank
    alike): for a model of one's own, for a tp_plan passed to initialize, and for a sequence whose
    length tp does not divide (at the first collective that splits it)."""
    from zeroplan.runtime.parallel import GPT_PLAN
    from zeroplan.schemas import ConfigError

    gpt = {"model": "gpt", "stage": 0, "dp": 1, "tp": dist.get_world_size(), "accum": 1, "sp": True}

    def odd_sequence():
        engine = initialize(build_model("gpt"), plan=tp_plan(gpt))
        try:
            batch = batch_of(gpt, 0, 0, 0)
            engine(input_ids=batch["input_ids"][:, :7], labels=batch["labels"][:, :7])
        finally:
            engine.close()

    attempts = {"own model": lambda: initialize(build_model("tiny"), plan=tp_plan(dict(gpt, model="tiny"))).close(),
                "own plan": lambda: initialize(build_model("gpt"), plan=tp_plan(gpt), tp_plan=GPT_PLAN).close(),
                "odd sequence": odd_sequence}
    out = {}
    for label, attempt in attempts.items():
        try:
            attempt()
            out[label] = "accepted"
        except ConfigError as e:
            out[label] = str(e)
    return out if dist.get_rank() == 0 else None


def run_tp_jobs(jobs: list[tuple[str, str, dict]]) -> dict:
    """(id, worker name, kwargs) jobs in one spawn; per job the result or the traceback."""
    out = {}
    for job_id, fn, kwargs in jobs:
        try:
            out[job_id] = globals()[fn](**kwargs)
        except Exception:
            out[job_id] = "error on rank %d:\n%s" % (dist.get_rank(), traceback.format_exc())
    return out


# -- single-process reference -------------------------------------------------------------------
def reference(case: dict, steps: int = STEPS, *, model: nn.Module | None = None,
              batch=None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """fp32, one process, torch.optim.AdamW with clip_grad_norm_ on each whole global batch.
    `model` and `batch(step)` replace the case's (a Hugging Face model: its output's `.loss`)."""
    plan = tp_plan(case)
    model = build_model(case["model"]) if model is None else model
    params = [p for p in model.parameters() if p.requires_grad]
    o = plan.optimizer
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=o)
    whole, norms = dict(case, dp=1, accum=1), []
    for step in range(steps):
        out = model(**(batch_of(whole, step, 0, 0) if batch is None else batch(step)))
        loss = getattr(out, "loss", out)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, o.gradient_clipping)))
        opt.param_groups[0]["lr"] = schedule.lr()
        opt.step()
        schedule.step()
    return {k: v.detach().float() for k, v in model.state_dict().items()}, norms

