"""Rank workers for checkpoints, buckets, fp16 scaling and metrics (run through rt_cases.run_jobs)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from zeroplan.runtime import checkpoint, initialize
from zeroplan.schemas.plan import LossScalePlan

from rt_cases import build, case_plan, loss_of, micro_batch
from rt_plans import make_plan


def _train(engine, case: dict, steps: range) -> list[float]:
    losses = []
    for step in steps:
        for k in range(case["accum"]):
            loss = loss_of(engine(**micro_batch(case, step, dist.get_rank(), k)))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    return losses


def checkpoint_roundtrip(*, case: dict, directory: str) -> dict | None:
    """Train 4 steps straight; and 2 steps, save, load into a fresh engine, 2 more steps."""
    plan = case_plan(case)
    first = initialize(build(case["model"]), plan=plan)
    _train(first, case, range(2))
    first.save_checkpoint(directory, client_state={"epoch": 3, "note": "x", "t": torch.arange(3)})
    rng_after_save = torch.rand(3)
    straight = _train(first, case, range(2, 4))
    want = first.full_state_dict()
    first.close()

    torch.manual_seed(999)
    second = initialize(build(case["model"]), plan=plan)
    client = second.load_checkpoint(directory)
    rng_after_load = torch.rand(3)
    resumed = _train(second, case, range(second.global_steps, 4))
    got = second.full_state_dict()
    steps = second.global_steps
    second.close()
    if dist.get_rank():
        return None
    diff = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    return {"diff": diff, "client": client, "steps": steps, "losses": (straight, resumed),
            "rng_equal": bool(torch.equal(rng_after_save, rng_after_load))}


class SimulatedCrash(Exception):
    pass


def interrupted_save(*, case: dict, directory: str) -> dict | None:
    """Save at step 2; crash every rank in the middle of the save at step 4; load the survivor."""
    plan = case_plan(case)
    engine = initialize(build(case["model"]), plan=plan)
    _train(engine, case, range(2))
    engine.save_checkpoint(directory, client_state={"at": 2})
    at_two = engine.full_state_dict()
    _train(engine, case, range(2, 4))
    original = checkpoint.write_state

    def crash(path, state):
        raise SimulatedCrash(f"killed while writing {path}")

    checkpoint.write_state = crash
    try:
        engine.save_checkpoint(directory, client_state={"at": 4})
        crashed = False
    except checkpoint.CheckpointError as e:  # every rank hears of every rank's failure
        crashed = "SimulatedCrash: killed while writing" in str(e) and "rank" in str(e)
    finally:
        checkpoint.write_state = original
    engine.close()
    dist.barrier()
    fresh = initialize(build(case["model"]), plan=plan)
    client = fresh.load_checkpoint(directory)
    got = fresh.full_state_dict()
    steps = fresh.global_steps
    fresh.close()
    if dist.get_rank():
        return None
    listing = sorted(p.name for p in Path(directory).iterdir())
    diff = max((got[k].float() - at_two[k].float()).abs().max().item() for k in at_two)
    return {"crashed": crashed, "client": client, "steps": steps, "diff": diff, "listing": listing,
            "latest": (Path(directory) / "latest").read_text().strip()}


def bucket_counts(*, stage: int, bucket: int, accum: int = 2) -> dict:
    """Collective calls of one optimizer step for `reduce_bucket_size` = bucket."""
    case = {"model": "gpt", "stage": stage, "world": dist.get_world_size(), "accum": accum, "reduce_bucket": bucket}
    engine = initialize(build("gpt"), plan=case_plan(case))
    _train(engine, case, range(1))
    comms = engine.metrics()["comms"]
    numels = [s.numel for s in engine.zero.layout.slots]
    engine.close()
    return {"comms": comms, "numels": numels}


def fp16_overflow(*, stage: int) -> dict:
    """fp16 with DeepSpeed's scaler: a huge start scale overflows and is skipped on every rank;
    an overflow on one rank only is skipped on all ranks; training then proceeds."""
    case = {"model": "gpt", "stage": stage, "world": dist.get_world_size(), "accum": 1}
    plan = make_plan(stage=stage, world=case["world"], micro=12 // case["world"], dtype="fp16",
                     loss_scaling=LossScalePlan(enabled=True, initial_scale_power=20, window=3, hysteresis=2,
                                                min_scale=1.0))
    engine = initialize(build("gpt"), plan=plan)
    log = []
    for step in range(12):
        before = engine.zero.master.clone()
        batch = micro_batch(case, step, dist.get_rank(), 0)
        loss = loss_of(engine(**batch))
        if step == 10 and dist.get_rank() == 1:
            loss = loss * 1e30
        skipped = engine.skipped_steps
        engine.backward(loss)
        engine.step()
        moved = bool((engine.zero.master != before).any())
        log.append({"step": step, "skipped": engine.skipped_steps > skipped, "moved": moved,
                    "scale": engine.scaler.loss_scale, "loss": float(loss.detach().float())})
    engine.close()
    return {"log": log}


def metrics_after_training(*, stage: int) -> dict:
    case = {"model": "gpt", "stage": stage, "world": dist.get_world_size(), "accum": 2}
    engine = initialize(build("gpt"), plan=case_plan(case))
    _train(engine, case, range(3))
    out = engine.metrics()
    engine.close()
    return out


def compiled_step_comms(*, plan_json: str, every_rank: bool = False, model: str = "tiny") -> dict | list | None:
    """One optimizer step of a preset GPT under a compiled plan; rank 0's logged collectives, or
    with `every_rank` each rank's, with its pipeline stage and parameter tensors' sizes."""
    from zeroplan.runtime.models import GPT, MarkovChainData
    from zeroplan.schemas import MODEL_PRESETS, Plan

    plan = Plan.model_validate_json(plan_json)
    spec = MODEL_PRESETS[model]
    torch.manual_seed(0)
    engine = initialize(GPT(spec), plan=plan)
    data = MarkovChainData(vocab=spec.vocab, seq_len=spec.seq_len).iterate(
        global_batch_size=plan.batch.global_batch_size, micro_batch_size=plan.batch.micro_batch_size,
        dp=plan.parallel.dp, dp_rank=engine.groups.dp_rank)
    engine.train_batch(data)
    mine = {"comms": engine.last_comms, "skipped": engine.skipped_steps, "stage": engine.groups.pp_rank,
            "numels": [s.numel for s in engine.zero.layout.slots]}
    ranks: list = [None] * dist.get_world_size()
    if every_rank:
        dist.all_gather_object(ranks, mine)
    engine.close()
    if dist.get_rank():
        return None
    return ranks if every_rank else {"comms": mine["comms"], "skipped": mine["skipped"]}


def per_rank_collectives() -> dict:
    """Collectives' per-rank reduce-scatter and all-gather (gloo) against torch's flat forms on
    the same inputs: the values, the caller's input left alone unless it is scratch, and the
    asynchronous handles; the in-place all-gather (a parameter's own storage) both ways."""
    from zeroplan.runtime.comm import Collectives, CommsLogger

    coll = Collectives(group=dist.group.WORLD, logger=CommsLogger())
    world, rank = coll.size, coll.rank
    g = torch.Generator().manual_seed(7 + rank)
    inp = torch.randn(world * 1001, generator=g)
    kept = inp.clone()
    native = torch.empty(1001)
    dist.reduce_scatter_tensor(native, inp.clone())
    out = torch.empty(1001)
    coll.reduce_scatter(out, inp)
    untouched = torch.equal(inp, kept)
    scratch = inp.clone()
    later = torch.empty(1001)
    coll.reduce_scatter(later, scratch, async_op=True, scratch_input=True).wait()
    part = torch.randn(333, generator=g)
    gathered_native = torch.empty(world * 333)
    dist.all_gather_into_tensor(gathered_native, part)
    gathered = torch.full((world * 333,), float("nan"))
    coll.all_gather(gathered, part, async_op=True).wait()
    logged, per_rank_form = coll.logger.snapshot(), coll.per_rank
    in_place = {}
    for per_rank in (True, False):  # the in-place all-gather, per rank and as gloo's flat collective
        coll.per_rank = per_rank
        rows = torch.full((world, 333), float("nan"))
        rows[rank] = part
        coll.all_gather_rows(rows, async_op=True).wait()
        in_place[per_rank] = torch.equal(rows.view(-1), gathered_native)
    return {"per_rank": per_rank_form, "untouched": untouched,
            "rs_diff": (out - native).abs().max().item(), "rs_async_equal": torch.equal(out, later),
            "ag_equal": torch.equal(gathered, gathered_native), "ag_in_place_equal": in_place, "logged": logged}
