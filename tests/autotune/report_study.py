"""A small real Optuna study in a real SQLite file, shaped like the tuner's, for report tests.

Its objective records what the tuner records (autotune/tune.py: predicted and measured
memory and step time, reasons) without running training, so the report is checked on
completed, failed, pruned and reused trials in seconds. Each completed trial gets a real
compiled plan in its folder, where the tuner keeps it.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from zeroplan.compiler import compile as compile_plan
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, validate_config

GIB = 1024**3
CRASH = "crashed (exit 1) at step 1: RuntimeError: injected crash | trial 'x' < 2"
"""A reason with characters HTML must escape."""
NO_REASON_NUMBER = 5
"""The trial that fails without recording a reason (as one failed by Optuna's heartbeat)."""
TRIALS = [  # (stage, micro-batch, offload) in the order they run
    (3, 4, "none"), (0, 2, "none"), (2, 4, "cpu"), (1, 4, "none"), (2, 2, "none"), (1, 2, "cpu"), (3, 4, "none"),
]


class Failed(Exception):
    """A trial that ran and failed (the tuner's TrialFailed)."""


def _plan(out_dir: Path, number: int, *, stage: int, micro: int) -> None:
    config = validate_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": micro,
                              "zero_optimization": {"stage": stage},
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, world_size=2)
    plan = compile_plan(config, MODEL_PRESETS["tiny"], CLUSTER_PRESETS["cpu"], nproc_per_node=2)
    plan.save(out_dir / "trials" / f"trial-{number:04d}" / "plan.json")


def objective(trial: optuna.Trial, *, out_dir: Path, pareto: bool) -> float | tuple[float, float]:
    stage = trial.suggest_int("zero_optimization.stage", 0, 3)
    micro = trial.suggest_categorical("train_micro_batch_size_per_gpu", [2, 4])
    trial.suggest_categorical("zero_optimization.offload_optimizer.device", ["none", "cpu"])
    if stage == 3:  # a conditional integer: missing from the other trials' rows
        trial.suggest_int("zero_optimization.stage3_max_live_parameters", 10**6, 10**9, log=True)
    trial.set_user_attr("predicted_peak_bytes", (5 - stage) * GIB // 2 * micro)
    trial.set_user_attr("predicted_step_time_s", 0.1 * (stage + 1) / micro)
    if trial.number == NO_REASON_NUMBER:
        raise Failed("no reason recorded")
    if stage == 0:
        trial.set_user_attr("reason", CRASH)
        raise Failed(CRASH)
    if stage == 1 and micro == 4:
        trial.set_user_attr("reason", "predicted 9.9 GiB/rank > 7.2 GiB budget")
        raise optuna.TrialPruned()
    if trial.number == len(TRIALS) - 1:  # the same plan as trial 0
        first = trial.study.trials[0]
        trial.set_user_attr("reason", "same plan as trial 0; result reused")
        trial.set_user_attr("duplicate_of", 0)
        for key in ("measured_samples_per_s", "measured_peak_bytes", "measured_step_time_s"):
            trial.set_user_attr(key, first.user_attrs[key])
        return tuple(first.values) if pareto else first.values[0]
    step = 0.11 * (stage + 1) / micro
    peak = int((5 - stage) * GIB // 2 * micro * 1.05)
    trial.set_user_attr("measured_step_time_s", step)
    trial.set_user_attr("measured_samples_per_s", 16 / step)
    trial.set_user_attr("measured_peak_bytes", peak)
    _plan(out_dir, trial.number, stage=stage, micro=micro)
    return (16 / step, float(peak)) if pareto else 16 / step


def build_study(out_dir: Path, *, pareto: bool = False, trials: list[tuple] = TRIALS) -> optuna.Study:
    """The study of `trials` in `out_dir/study.db`; of TRIALS: 3 completed, 1 reused, 2 failed, 1 pruned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=f"sqlite:///{out_dir / 'study.db'}", study_name="report-test",
                                directions=["maximize", "minimize"] if pareto else ["maximize"])
    for stage, micro, offload in trials:
        params = {"zero_optimization.stage": stage, "train_micro_batch_size_per_gpu": micro,
                  "zero_optimization.offload_optimizer.device": offload}
        if stage == 3:
            params["zero_optimization.stage3_max_live_parameters"] = 10**8
        study.enqueue_trial(params)
    study.optimize(lambda t: objective(t, out_dir=out_dir, pareto=pareto), n_trials=len(trials), catch=(Failed,))
    return study
