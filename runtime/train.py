"""Train the built-in GPT on synthetic Markov-chain data, or your model (`--model
module:function`, see user_model.py), under a plan; run under torchrun (or plainly for one
process) by `zeroplan train`.

    python -m zeroplan.runtime.train --plan plan.json --model tiny --steps 50 --metrics m.jsonl
    python -m zeroplan.runtime.train --plan plan.json --model my_model:build --steps 50

Rank 0 shows a progress bar (loss, samples/s, peak memory), prints a line every
`logging.steps_per_print` steps, and writes a StepRecord per step to --metrics, then a
SummaryRecord with every rank's peak memory and the mean step time (schemas/steps.py). Each rank runs under
`rank.run_rank` (bound to its launcher, reporting how it ended). A run whose loss is not
finite never ends with status 0: `precision.nonfinite` "stop" ends it at that step; with
"skip" the skipped steps are counted and left out of the summary's losses.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from zeroplan.schemas import ModelSpec, Plan
from zeroplan.schemas.model import is_model_function
from zeroplan.schemas.paths import writable_file
from zeroplan.schemas.steps import StepRecord, SummaryRecord

from .initialize import initialize
from .metrics import gather_peaks
from .models import GPT, MarkovChainData
from .precision import NonFiniteError
from .rank import run_rank
from .run_env import MAX_STEPS_ENV, METRICS_ENV
from .user_model import build_user_model, tokens_per_sample, user_batches

MIB = 2 ** 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zeroplan.runtime.train", description=__doc__.splitlines()[0])
    p.add_argument("--plan", required=True, type=Path, help="plan.json from `zeroplan compile`")
    p.add_argument("--model", default="tiny", help="gpt preset (tiny, small, medium), a ModelSpec JSON, "
                   "or module:function returning (model, get_batch)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--metrics", type=Path, default=None, help="write per-step metrics as JSON lines here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _workload(args: argparse.Namespace, plan: Plan):
    """(engine, micro-batch iterator, model name, tokens per sample) of the built-in GPT or a user model."""
    torch.manual_seed(args.seed)
    batch = plan.batch
    if is_model_function(args.model):
        model, get_batch = build_user_model(args.model)
        engine = initialize(model, plan=plan)
        tokens = tokens_per_sample(get_batch(batch.micro_batch_size, 0))
        return engine, user_batches(get_batch, micro_batch_size=batch.micro_batch_size), args.model, tokens
    spec = ModelSpec.load(args.model)
    engine = initialize(GPT(spec), plan=plan)
    data = MarkovChainData(vocab=spec.vocab, seq_len=spec.seq_len, seed=args.seed).iterate(
        global_batch_size=batch.global_batch_size, micro_batch_size=batch.micro_batch_size,
        dp=engine.groups.dp_size, dp_rank=engine.groups.dp_rank)
    return engine, data, spec.name, spec.seq_len


def run(args: argparse.Namespace) -> SummaryRecord:
    plan = Plan.load(args.plan)
    for name in (METRICS_ENV, MAX_STEPS_ENV):  # this loop has --steps and --metrics of its own
        os.environ.pop(name, None)
    engine, data, name, tokens = _workload(args, plan)
    groups = engine.groups
    rank0 = groups.rank == 0
    out = writable_file(args.metrics, key="--metrics").open("w") if (rank0 and args.metrics) else None
    losses, taken, started = [], [], time.perf_counter()
    with _progress(enabled=rank0, total=args.steps) as bar:
        for step in range(args.steps):
            skipped = engine.skipped_steps
            engine.train_batch(data)
            losses.append(engine.last_loss)  # over the dp ranks; with pp > 1 the last stage's
            taken.append(engine.skipped_steps == skipped)  # False: skipped as non-finite
            line = StepRecord(step=step + 1, loss=losses[-1], lr=engine.get_lr(), skipped=not taken[-1],
                              **engine.metrics())
            if out:
                out.write(line.to_line())
                out.flush()
            if rank0:
                bar(line)
                if (step + 1) % plan.logging.steps_per_print == 0 or step + 1 == args.steps:
                    print(_text(line, args.steps), flush=True)
    summary = _summary(engine, _taken_losses(losses, taken), wall=time.perf_counter() - started, name=name,
                       tokens_per_sample=tokens)
    if out:
        out.write(summary.to_line())
        out.close()
    if rank0:
        print(summary.to_line(), end="", flush=True)
    engine.close()
    return summary


def _taken_losses(losses: list[float], taken: list[bool]) -> list[float]:
    """The losses of the steps taken (not skipped as non-finite): the same on every rank. A run
    with a non-finite loss never reports success."""
    for step, (loss, ok) in enumerate(zip(losses, taken), start=1):
        if ok and not math.isfinite(loss):
            raise NonFiniteError(step=step, what="the loss", value=loss, local_loss=None)
    kept = [x for x, ok in zip(losses, taken) if ok]
    if not kept:
        raise NonFiniteError(step=len(losses), what="the loss of every step", value=float("nan"), local_loss=None)
    return kept


def _summary(engine, losses: list[float], *, wall: float, name: str, tokens_per_sample: int) -> SummaryRecord:
    """`losses`: those of the steps taken."""
    peaks = gather_peaks(peak_bytes=engine.metrics()["peak_rss_bytes"], group=None)  # every rank: all stages
    times = engine.meter.times[1:] or engine.meter.times  # the first step includes warm-up
    mean = sum(times) / len(times)
    p = engine.plan.parallel
    return SummaryRecord(model=name, stage=engine.plan.zero.stage, world_size=engine.groups.world_size,
                         dp=p.dp, tp=p.tp, pp=p.pp, pipeline_schedule=p.pipeline_schedule if p.pp > 1 else None,
                         dtype=engine.plan.precision.param_dtype, steps=engine.global_steps,
                         skipped_steps=engine.skipped_steps, loss_start=losses[0], loss_end=losses[-1],
                         mean_step_time_s=mean, samples_per_s=engine.plan.batch.global_batch_size / mean,
                         tokens_per_s=engine.plan.batch.global_batch_size * tokens_per_sample / mean,
                         peak_rss_bytes_per_rank=peaks, wall_s=wall, comms_per_step=engine.last_comms)


def _text(line: StepRecord, total: int) -> str:
    return (f"step {line.step}/{total}  loss {line.loss:.4f}  lr {line.lr:.3g}  "
            f"{line.samples_per_s or 0:.1f} samples/s  peak {line.peak_rss_bytes / MIB:.0f} MiB")


class _progress:
    """A rich progress bar on rank 0 (on a terminal); a no-op elsewhere."""

    def __init__(self, *, enabled: bool, total: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total

    def __enter__(self):
        if not self.enabled:
            return lambda line: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self.progress.__enter__()
        task = self.progress.add_task("train", total=self.total, info="")

        def update(line: StepRecord) -> None:
            info = (f"loss {line.loss:.3f}  {line.samples_per_s or 0:.1f} samples/s  "
                    f"{line.peak_rss_bytes / MIB:.0f} MiB")
            self.progress.update(task, advance=1, info=info)
        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
        return False


def main(argv: list[str] | None = None) -> int:
    return run_rank(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
