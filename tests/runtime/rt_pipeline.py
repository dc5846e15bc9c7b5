"""Rank workers and references of the pipeline tests (run through rt_cases.run_jobs as
"rt_pipeline:<function>")."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zeroplan.runtime import initialize
from zeroplan.runtime.parallel import PipelineModule
from zeroplan.runtime.schedulers import build_schedule
from zeroplan.schemas.batch import BatchPlan
from zeroplan.schemas.plan import ParallelPlan, WorldPlan

from rt_cases import GLOBAL_BATCH, build, micro_batch
from rt_plans import make_plan

STEPS = 4
SEQ_IN, SEQ_OUT = 6, 4


def build_seq() -> PipelineModule:
    """A user's nn.Sequential with an MSE loss, wrapped for the pipeline."""
    torch.manual_seed(4321)
    layers = nn.Sequential(nn.Linear(SEQ_IN, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                           nn.Tanh(), nn.Linear(16, SEQ_OUT))
    return PipelineModule(layers=layers, loss_fn=F.mse_loss)


def build_model(kind: str) -> nn.Module:
    return build_seq() if kind == "seq" else build(kind)


def pipe_plan(*, stage: int, dp: int, pp: int, accum: int, schedule: str = "1f1b", method: str = "parameters",
              dtype: str = "fp32", tp: int = 1, checkpointing=None):
    """make_plan's optimizer (AdamW, clipping at 0.5) and schedule, at dp x tp x pp."""
    micro, world = GLOBAL_BATCH // (dp * accum), dp * tp * pp
    base = make_plan(stage=stage, world=world, accum=accum, micro=micro, dtype=dtype, checkpointing=checkpointing)
    return base.model_copy(update={
        "world": WorldPlan(nnodes=1, nproc_per_node=world, world_size=world),
        "parallel": ParallelPlan(dp=dp, tp=tp, pp=pp, pipeline_schedule=schedule, pipeline_micro_batches=accum,
                                 pipeline_partition_method=method),
        "batch": BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=micro, gradient_accumulation_steps=accum)})


def seq_batch(step: int, lo: int = 0, size: int = GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, SEQ_IN, generator=g)
    y = torch.randn(GLOBAL_BATCH, SEQ_OUT, generator=g)
    return x[lo:lo + size], y[lo:lo + size]


def data_iter(case: dict, *, dp_rank: int, start: int = 0):
    """This dp rank's micro-batches of steps start, start + 1, ... (the same on every stage)."""
    dp, accum = case["dp"], case["accum"]
    step = start
    while True:
        for k in range(accum):
            if case["model"] == "seq":
                micro = GLOBAL_BATCH // (dp * accum)
                yield seq_batch(step, (k * dp + dp_rank) * micro, micro)
            else:
                yield micro_batch({"model": "gpt", "world": dp, "accum": accum, "stage": case["stage"]}, step,
                                  dp_rank, k)
        step += 1


def _engine(case: dict):
    plan = pipe_plan(stage=case["stage"], dp=case["dp"], pp=case["pp"], accum=case["accum"],
                     schedule=case.get("schedule", "1f1b"), method=case.get("method", "parameters"),
                     dtype=case.get("dtype", "fp32"), tp=case.get("tp", 1),
                     checkpointing=case.get("checkpointing"))
    return initialize(build_model(case["model"]), plan=plan)


def pp_train(*, case: dict) -> dict | None:
    """Train STEPS steps; rank 0 returns the consolidated parameters, losses, norms and the
    most micro-batches every rank held at once."""
    engine = _engine(case)
    data = data_iter(case, dp_rank=engine.groups.dp_rank)
    losses, norms = [], []
    for _ in range(STEPS):
        losses.append(float(engine.train_batch(data)))
        norms.append(engine.last_grad_norm)
    try:
        engine(next(data))
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    full = engine.full_state_dict()
    coords = (engine.groups.pp_rank, engine.groups.dp_rank, engine.max_in_flight, losses)
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, coords)
    recomputed: list = [None] * dist.get_world_size()
    dist.all_gather_object(recomputed, engine.checkpointing.calls)
    comms = engine.last_comms
    engine.close()
    if dist.get_rank():
        return None
    return {"params": full, "losses": losses, "norms": norms, "per_rank": per_rank, "refused": refused,
            "comms": comms, "recomputed": sum(recomputed)}


def refuses_plain_sequential() -> str:
    plan = pipe_plan(stage=0, dp=1, pp=dist.get_world_size(), accum=2)
    try:
        initialize(build_seq().layers, plan=plan)
    except Exception as e:  # ConfigError
        return f"{type(e).__name__}: {e}"
    return "accepted"


def pp_checkpoint(*, case: dict, directory: str) -> dict | None:
    """Train 4 steps straight; and 2, save, load into a fresh engine, 2 more. Then a dp-only
    engine of the same world loads the pipeline checkpoint (a reshard): the same whole model."""
    first = _engine(case)
    data = data_iter(case, dp_rank=first.groups.dp_rank)
    for _ in range(2):
        first.train_batch(data)
    first.save_checkpoint(directory, client_state={"epoch": 7})
    saved = first.full_state_dict()
    straight = [float(first.train_batch(data)) for _ in range(2)]
    want = first.full_state_dict()
    first.close()

    torch.manual_seed(999)
    second = _engine(case)
    client = second.load_checkpoint(directory)
    data = data_iter(case, dp_rank=second.groups.dp_rank, start=second.global_steps)
    resumed = [float(second.train_batch(data)) for _ in range(2)]
    got = second.full_state_dict()
    second.close()

    world = dist.get_world_size()
    flat = initialize(build_model(case["model"]), plan=make_plan(stage=case["stage"], world=world, accum=1,
                                                                 micro=GLOBAL_BATCH // world))
    flat.load_checkpoint(directory)
    resharded = flat.full_state_dict()
    flat.close()
    if dist.get_rank():
        return None
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    reshard_diff = max((resharded[k] - saved[k]).abs().max().item() for k in saved)
    return {"diff": diff, "keys": sorted(got) == sorted(want), "losses": (straight, resumed), "client": client,
            "reshard_diff": reshard_diff}


# -- single-process reference ------------------------------------------------------------------
def reference_seq(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The wrapped nn.Sequential in one process: torch.optim.AdamW on the whole global batch,
    clipping and the schedule as the plan says."""
    plan = pipe_plan(stage=0, dp=1, pp=1, accum=1)
    model = build_seq()
    o = plan.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=plan.optimizer)
    for step in range(steps):
        loss = model(*seq_batch(step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.gradient_clipping)
        opt.param_groups[0]["lr"] = schedule.lr()
        opt.step()
        schedule.step()
    return {k: v.detach() for k, v in model.state_dict().items()}
