"""Models, data, rank workers and single-process references shared by the runtime tests."""

from __future__ import annotations

import functools
import traceback

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from zeroplan.runtime import initialize
from zeroplan.runtime.models import GPT, MarkovChainData
from zeroplan.runtime.schedulers import build_schedule
from zeroplan.schemas import ModelSpec

from rt_optimizers import reference_optimizer
from rt_plans import make_plan
from rt_tolerance import compare

SPEC = ModelSpec(name="test", layers=2, hidden=32, heads=2, ffn=128, vocab=97, seq_len=8)
GLOBAL_BATCH = 12
STEPS = 5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Pair(nn.Module):
    """Returns a tuple."""

    def __init__(self, width: int):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        return self.a(x), torch.tanh(self.b(x))


class Zoo(nn.Module):
    """What breaks naive ZeRO: a tied head, a frozen layer, a module used twice, BatchNorm
    buffers, a branch that some steps (or ranks) skip, odd sizes, tuple and dict outputs.

    BatchNorm comes first on purpose: after a biased layer it would make that bias's gradient
    analytically zero, and Adam turns such a gradient's rounding noise into full-size steps of
    either sign, which no summation order can reproduce."""

    def __init__(self, vocab: int = 11, width: int = 13):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.frozen = nn.Linear(width, width).requires_grad_(False)
        self.pair = Pair(width)
        self.shared = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.extra = nn.Linear(width, width, bias=False)
        self.odd = nn.Linear(width, 7)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, labels, extra):
        h = self.bn(self.emb(ids))
        h = h + self.frozen(h)
        a, b = self.pair(h)
        h = self.shared(a) + self.shared(b)
        if bool(extra):
            h = h + self.extra(h)
        h = h + self.odd(h).sum(-1, keepdim=True) / 7
        logits = self.head(h)
        return {"loss": F.cross_entropy(logits.float(), labels), "logits": logits}


class Wide(nn.Module):
    """A matrix of compiler.shards.IN_PLACE_MIN elements between small tensors (on SPEC's
    tokens): stages 1-2 on gloo publish it into its own storage and the tensors around it
    through a bucket buffer, in one step (compiler.shards.publish_gathers)."""

    def __init__(self, vocab: int = SPEC.vocab, width: int = 1024):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.wide = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, labels):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.wide(h))
        logits = self.head(self.norm(h))
        return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())}


def build(kind: str) -> nn.Module:
    """"gpt", "zoo", "wide", or "gpt-torch-checkpoint": the GPT recomputing its blocks with
    torch's own checkpoint, as a user's model would (early stop on)."""
    torch.manual_seed(1234)
    if kind == "zoo":
        return Zoo()
    if kind == "wide":
        return Wide()
    model = GPT(SPEC)
    if kind == "gpt-torch-checkpoint":
        model.checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return model


def micro_batch(case: dict, step: int, rank: int, k: int) -> dict:
    world, accum = case["world"], case["accum"]
    micro = GLOBAL_BATCH // (world * accum)
    lo = (k * world + rank) * micro
    if case["model"] != "zoo":
        tokens = MarkovChainData(vocab=SPEC.vocab, seq_len=SPEC.seq_len).global_batch(step, GLOBAL_BATCH)
        rows = tokens[lo:lo + micro]
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)
    labels = torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)
    extra = step % 2 == 0 if case["stage"] == 3 else (step + rank) % 2 == 0
    return {"ids": ids[lo:lo + micro], "labels": labels[lo:lo + micro], "extra": torch.tensor(extra)}


def case_plan(case: dict):
    micro = GLOBAL_BATCH // (case["world"] * case["accum"])
    return make_plan(stage=case["stage"], world=case["world"], accum=case["accum"], micro=micro,
                     dtype=case.get("dtype", "fp32"), overlap=case.get("overlap", False),
                     persistence=case.get("persistence", 40), optimizer=case.get("optimizer"),
                     reduce_bucket=case.get("reduce_bucket", 500), offload=case.get("offload"),
                     kernel=case.get("kernel", "torch_foreach"), sub_group=case.get("sub_group", 10**9),
                     checkpointing=case.get("checkpointing"), prefetch=case.get("prefetch", 2000),
                     reduce_scatter=case.get("reduce_scatter", True),
                     **{k: case[k] for k in ("model_persistence", "max_live", "max_reuse", "monitors", "wall_clock",
                                             "comms_logger", "timeout_s", "nonfinite") if k in case})


def loss_of(out):
    return out["loss"] if isinstance(out, dict) else out


# -- rank workers ------------------------------------------------------------------------------
def train_case(*, case: dict, steps: int = STEPS) -> dict | None:
    """Train `case` on this rank; rank 0 returns the consolidated fp32 parameters and losses."""
    rank = dist.get_rank()
    engine = initialize(build(case["model"]), plan=case_plan(case))
    resident = sum(p.untyped_storage().nbytes() for p in engine.module.parameters())  # before any forward
    losses = []
    for step in range(steps):
        for k in range(case["accum"]):
            loss = loss_of(engine(**micro_batch(case, step, rank, k)))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    full = engine.full_state_dict()
    published = _published_gap(engine, full) if case["stage"] < 3 else 0.0
    recomputed, comms = engine.checkpointing.calls, engine.last_comms
    stage3 = {"peak_live": engine.zero.peak_live, "persistent": len(engine.zero.persistent),
              "resident_after_init": resident} if case["stage"] == 3 else {}
    engine.close()
    return {"params": full, "losses": losses, "published_gap": published, "recomputed": recomputed,
            "comms": comms, **stage3} if rank == 0 else None


def _published_gap(engine, full: dict) -> float:
    """Largest |model parameter - master rounded to the training dtype| (stages 0-2 keep them whole)."""
    gap = 0.0
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            gap = max(gap, (p.detach().float() - full[name].to(p.dtype).float()).abs().max().item())
    return gap


def run_jobs(jobs: list[tuple[str, str, dict]]) -> dict:
    """Run (id, worker function name, kwargs) jobs in one spawn; per job the result or the
    traceback, so one failing case names itself and the others still report."""
    import importlib

    out = {}
    for job_id, fn, kwargs in jobs:
        module, _, name = fn.rpartition(":")  # "module:function" names a worker outside rt_jobs
        target = globals().get(fn) or getattr(importlib.import_module(module or "rt_jobs"), name)
        try:
            out[job_id] = target(**kwargs)
        except Exception:
            out[job_id] = "error on rank %d:\n%s" % (dist.get_rank(), traceback.format_exc())
    return out


# -- single-process references -------------------------------------------------------------------
def _adamw(model: nn.Module, plan) -> tuple[list, torch.optim.Optimizer]:
    masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters() if p.requires_grad]
    o = plan.optimizer
    opt = reference_optimizer(masters, o)  # Lamb, Lion, Adagrad, Adam without bias correction
    if opt is not None:
        pass
    elif o.type == "SGD":
        opt = torch.optim.SGD(masters, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    elif o.type == "Adam":
        opt = torch.optim.Adam(masters, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(masters, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return masters, opt


def reference_global(case: dict, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """fp32, one process, torch.optim on the whole global batch of every step."""
    plan = case_plan(case)
    model = build(case["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    _, opt = _adamw(model, plan)
    opt.param_groups[0]["params"] = params
    opt.state.clear()
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=plan.optimizer)
    whole = dict(case, world=1, accum=1)
    for step in range(steps):
        loss = loss_of(model(**micro_batch(whole, step, 0, 0)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, plan.optimizer.gradient_clipping)
        opt.param_groups[0]["lr"] = schedule.lr()
        opt.step()
        schedule.step()
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def reference_micro(case: dict, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """One process, the same micro-batches as the ranks, the model in the case's dtype, fp32
    master weights and gradient sums, torch.optim on the masters. A parameter no micro-batch
    of the step reached is left out of that step, as torch.optim leaves a `.grad` of None
    (`missing_grads: skip`; with `zero` it steps with a zero gradient)."""
    plan = case_plan(case)
    model = build(case["model"])
    masters, opt = _adamw(model, plan)
    model.to(DTYPES[case.get("dtype", "fp32")])
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=plan.optimizer)
    world, accum = case["world"], case["accum"]
    for step in range(steps):
        total = [torch.zeros_like(m) for m in masters]
        reached = [plan.optimizer.missing_grads == "zero"] * len(masters)
        for rank in range(world):
            acc = [torch.zeros_like(m) for m in masters]
            for k in range(accum):
                batch = micro_batch(case, step, rank, k)
                loss = loss_of(model(**batch))
                (loss.float() / accum).backward()
                for i, (a, p) in enumerate(zip(acc, params)):
                    if p.grad is not None:
                        a += p.grad.float()
                        reached[i] = True
                    p.grad = None
            total = [t + a for t, a in zip(total, acc)]
        for m, t in zip(masters, total):
            m.grad = t / world
        if plan.optimizer.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(masters, plan.optimizer.gradient_clipping)
        opt.param_groups[0]["lr"] = schedule.lr()
        opt.param_groups[0]["params"] = [m for m, r in zip(masters, reached) if r]
        opt.step()
        opt.param_groups[0]["params"] = masters
        schedule.step()
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)
    named = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], masters))
    return {k: named[k].detach() if k in named else v.detach().float() for k, v in model.state_dict().items()}


def max_diff(got: dict, want: dict, *, model: str) -> tuple[float, str]:
    """Largest |got - want| over the trainable parameters of test model `model`, and where:
    for two runs of the runtime that do the same arithmetic (no reference involved)."""
    worst, where = 0.0, ""
    for name, p in build(model).named_parameters():
        if p.requires_grad:
            d = (got[name].float() - want[name].float()).abs().max().item()
            if d > worst or not where:
                worst, where = d, name
    return worst, where


def mismatches(got: dict, want: dict, *, case: dict, steps: int = STEPS) -> list[str]:
    """`got` against a single-process reference of `case` (rt_tolerance says what is held how)."""
    return compare(got, want, model=build(case["model"]), plan=case_plan(case), steps=steps)
