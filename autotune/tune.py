"""`tune`: search the knobs of a config by measuring short runs of the real runtime.

Each trial:
  1. asks the sampler for knob values and writes them into the config data;
  2. validates and compiles the result into a concrete Plan; a candidate the config rules
     or the compiler refuse is pruned with that reason, costing no run;
  3. prunes a candidate whose predicted per-rank memory exceeds the budget (device memory
     less the safety margin), costing no run;
  4. reuses the result of an earlier trial that compiled to the same Plan;
  5. otherwise runs `zeroplan train PLAN` in a subprocess for warm-up plus measured steps,
     reporting each measured step to Optuna's pruner, and records the measurement.
Failures (crash, timeout, NaN, out of memory) are recorded with their reason and the study
goes on. The study is stored (SQLite by default), so a killed tune resumes; a trial its killed
tuner left running is failed when the study resumes (study.fail_orphaned_trials). The study is
keyed by what it measures (identity.py): tuning another model, world, cluster, version or space
into the same storage opens a new study beside the old one and reuses nothing of it.

Several workers may share the study (workers.py on one machine, the same command with the same
storage on others): a plan is measured by one trial only (`Tuner._same_plan`: a later trial of
a plan another worker is measuring waits for it and reuses its result), a trial whose worker
died is failed by its heartbeat and enqueued once more (storage.py), and `max_trials` counts
the study's finished trials, whoever ran them (a worker may start one more while the last ones
finish).

The warm start enqueues no more trials than the run will run: an enqueued trial is WAITING in
the storage until some run takes it (Optuna runs waiting trials first), so a surplus would be
left behind as a phantom. Waiting trials (a run stopped by --timeout or a kill before it took
them) are not counted as trials; the next run of the study takes them first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
import warnings
from itertools import islice, product
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from zeroplan.compiler import compile as compile_plan
from zeroplan.compiler.emit import emit
from zeroplan.schemas import ClusterSpec, ConfigError, ConfigWarning, ModelSpec, Plan, TrainConfig, validate_config
from zeroplan.schemas.autotuning import directions
from zeroplan.schemas.steps import StepRecord
from zeroplan.schemas.cluster import GiB

from .identity import model_identity, study_identity
from .learned_cost import LearnedCost, Ranked, fit, measured_trials, next_plan, observations
from .models import TrialWorkload
from .results import trial_dir, write_results
from .runner import TrialOutcome, run_trial
from .space import Dimension, apply, search_space, suggest
from .study import (HEARTBEAT_S, experimental_ok, fail_orphaned_trials, grid_space, make_pruner, make_sampler,
                    mark_worker, open_identified_study, storage_url)



class TrialFailed(Exception):
    """A trial that ran and failed; its reason is in the trial's user attributes."""


@dataclass(frozen=True)
class TuneSettings:
    model_name: str
    """What the trials train (`zeroplan train --model`): a preset, a ModelSpec JSON, or
    module:function (models.py)."""
    nproc_per_node: int
    nnodes: int = 1
    out_dir: Path = Path("autotuning_results")
    objective: str = "throughput"
    max_trials: int = 20
    timeout_s: float | None = None
    """Wall-clock budget of the whole study; None: no limit."""
    trial_timeout_s: float = 600.0
    warmup_steps: int = 2
    measured_steps: int = 5
    storage: str | None = None
    study_name: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    memory_safety_margin: float = 0.1
    seed: int | None = None
    overwrite: bool = False
    warm_start: int = 3
    """Candidates ranked best by the cost model, enqueued first in a new study."""
    learn: bool = True
    """Refit the cost model's terms to the trials measured so far and enqueue the best untried
    candidate it predicts (learned_cost.py; `Tuner.after_trial`); throughput and latency only."""
    script: tuple[str, ...] = ()
    """A training script and its arguments that trials run instead of `model_name` (models.py)."""
    launch_dir: Path = Path(".")
    """Where the tune was started: on the trials' PYTHONPATH, and where a script runs."""
    heartbeat_s: float = HEARTBEAT_S
    """Seconds between a running trial's heartbeats; one silent for 3 of them (its worker died)
    is failed by another worker and run once more (storage.py)."""

    @property
    def workload(self) -> TrialWorkload:
        return TrialWorkload(model=self.model_name, script=self.script, cwd=self.launch_dir)


@dataclass
class TrialCandidate:
    """A point Optuna suggested: its parameters, and the plan compiled from them or why none
    can run (`reason`: refused by the compiler or over the memory limit)."""

    params: dict[str, Any]
    plan: Plan | None = None
    reason: str = ""


@dataclass
class TuneResult:
    study: optuna.Study
    best_plan: Plan | None
    out_dir: Path
    counts: dict[str, int] = field(default_factory=dict)


def plan_key(plan: Plan) -> str:
    """Identity of what a plan runs: everything but its estimates and provenance."""
    body = plan.model_dump(mode="json", exclude={"estimates", "provenance"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def predicted_peak(plan: Plan) -> int:
    """Predicted peak bytes per rank of the memory the rank is limited by.

    On a CPU "device" the host is the device, so host-resident categories (offloaded states)
    count against the same budget; on an accelerator they are checked per node instead.
    """
    device = sum(plan.estimates.memory_per_rank.values())
    if plan.world.device == "cpu":
        device += sum(plan.estimates.host_memory_per_rank.values())
    return device


Launcher = Callable[[Path, int, Path], list[str]]
"""(plan path, steps, metrics path) -> the command line of one trial (see runner.py for the
metrics it must write)."""


class Tuner:
    """Holds what every trial needs; `objective` is what Optuna calls."""

    def __init__(self, *, data: dict, model: ModelSpec, cluster: ClusterSpec, settings: TuneSettings,
                 launcher: Launcher | None = None):
        self.data, self.model, self.cluster, self.settings = data, model, cluster, settings
        self.launcher = launcher or settings.workload.command
        self.world_size = settings.nnodes * settings.nproc_per_node
        self.config: TrainConfig = validate_config(copy.deepcopy(data))
        self.dims: list[Dimension] = search_space(self.config, world_size=self.world_size, model=model)
        self._ranked: list[Ranked] | None = None

    def candidate(self, params: dict[str, Any]) -> TrialCandidate:
        """Validate and compile a choice of knob values; a refusal becomes the reason."""
        try:
            cfg = validate_config(apply(self.data, params), world_size=self.world_size)
            plan = compile_plan(cfg, self.model, self.cluster, nnodes=self.settings.nnodes,
                                nproc_per_node=self.settings.nproc_per_node, resolve_auto=True)
        except ConfigError as e:
            return TrialCandidate(params, reason="; ".join(p.render() for p in e.problems))
        return TrialCandidate(params, plan, self._memory_reason(plan))

    def _memory_reason(self, plan: Plan) -> str:
        """Why the memory model says the plan will not fit, or ""."""
        keep = 1 - self.settings.memory_safety_margin
        est = plan.estimates
        budget, peak = est.memory_limit_per_rank * keep, predicted_peak(plan)
        if budget and peak > budget:
            return f"predicted {peak / GiB:.1f} GiB/rank > {budget / GiB:.1f} GiB budget"
        host_budget = est.host_memory_per_node * keep
        if plan.world.device != "cpu" and host_budget and est.host_bytes_per_node > host_budget:
            return (f"predicted host memory {est.host_bytes_per_node / GiB:.1f} GiB/node > "
                    f"{host_budget / GiB:.1f} GiB budget")
        return ""

    def objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        mark_worker(trial)
        cand = self.candidate(suggest(trial, self.dims, config=self.config))
        if cand.plan is not None:
            trial.set_user_attr("plan_key", plan_key(cand.plan))
            trial.set_user_attr("predicted_peak_bytes", predicted_peak(cand.plan))
            trial.set_user_attr("predicted_step_time_s", cand.plan.estimates.predicted_step_time_s)
            trial.set_user_attr("predicted_terms", dict(cand.plan.estimates.step_time_breakdown_s))
            if self.learning:
                learned = self.learned(trial.study)
                trial.set_user_attr("learned_step_time_s", learned.predict(cand.plan.estimates.step_time_breakdown_s))
                trial.set_user_attr("learned_from_trials", learned.trials)
        if cand.reason:
            trial.set_user_attr("reason", cand.reason)
            raise optuna.TrialPruned(cand.reason)
        earlier = self._same_plan(trial, cand.plan)
        if earlier is not None:
            trial.set_user_attr("reason", f"same plan as trial {earlier.number}; result reused")
            trial.set_user_attr("duplicate_of", earlier.number)
            for key in ("measured_samples_per_s", "measured_peak_bytes", "measured_step_time_s"):
                if key in earlier.user_attrs:
                    trial.set_user_attr(key, earlier.user_attrs[key])
            return earlier.values[0] if len(earlier.values) == 1 else tuple(earlier.values)
        outcome = self._run(trial, cand.plan)
        return self._value(trial, cand.plan, outcome)

    def _same_plan(self, trial: optuna.Trial, plan: Plan) -> optuna.trial.FrozenTrial | None:
        """The trial whose measurement of this plan this one reuses, or None: run it here.

        A plan belongs to the first trial that measured it, or, while none has, to the
        lowest-numbered trial measuring it now (on any worker): a later trial of the same plan
        waits for that one and reuses its result, so several workers never measure one plan
        twice. If the owner ends without a result (failed, pruned, or its worker died: waiting
        fails trials whose heartbeat stopped), the next in line runs the plan itself."""
        key, study = plan_key(plan), trial.study
        deadline = time.monotonic() + self.settings.trial_timeout_s + 6 * self.settings.heartbeat_s + 60
        while True:
            owner = _plan_owner(study, key=key, before=trial.number)
            if owner is None or owner.state == optuna.trial.TrialState.COMPLETE or time.monotonic() > deadline:
                return owner if owner is not None and owner.state == optuna.trial.TrialState.COMPLETE else None
            time.sleep(OWNER_POLL_S)
            with experimental_ok():
                optuna.storages.fail_stale_trials(study)

    def _run(self, trial: optuna.Trial, plan: Plan) -> TrialOutcome:
        # the child runs there
        workdir = trial_dir(self.settings.out_dir, trial.study.study_name, trial.number).resolve()
        plan_path = plan.save(workdir / "plan.json")
        metrics = workdir / "metrics.jsonl"
        command = self.launcher(plan_path, self.settings.warmup_steps + self.settings.measured_steps, metrics)
        single = len(directions(self.settings.objective)) == 1
        workload = self.settings.workload
        return run_trial(command=command, metrics=metrics, workdir=workdir, timeout_s=self.settings.trial_timeout_s,
                         on_step=self._pruning_callback(trial) if single else (lambda _: False),
                         env=workload.env(), cwd=workload.run_dir(workdir))

    def _pruning_callback(self, trial: optuna.Trial) -> Callable[[StepRecord], bool]:
        warmup = self.settings.warmup_steps

        def on_step(report: StepRecord) -> bool:  # steps count from 1
            if report.step <= warmup:
                return False
            trial.report(self._step_value(report), step=report.step)
            return trial.should_prune()

        return on_step

    def _step_value(self, report: StepRecord) -> float:
        if self.settings.objective == "latency":
            return report.step_time_s
        if self.settings.objective == "memory":
            return float(report.peak_memory_bytes or 0)
        return report.samples_per_s or 0.0

    def _value(self, trial: optuna.Trial, plan: Plan, outcome: TrialOutcome) -> float | tuple[float, float]:
        trial.set_user_attr("wall_s", round(outcome.wall_s, 2))
        if outcome.state == "pruned":
            trial.set_user_attr("reason", outcome.reason)
            raise optuna.TrialPruned(outcome.reason)
        if outcome.state == "failed":
            trial.set_user_attr("reason", outcome.reason)
            trial.set_user_attr("log_tail", outcome.log_tail[-2000:])
            raise TrialFailed(outcome.reason)
        measured = [s for s in outcome.steps if s.step > self.settings.warmup_steps] or outcome.steps
        step_time = statistics.median(s.step_time_s for s in measured)
        throughput = plan.batch.global_batch_size / step_time
        peak = outcome.peak_memory_bytes or 0
        trial.set_user_attr("measured_samples_per_s", throughput)
        trial.set_user_attr("measured_step_time_s", step_time)
        trial.set_user_attr("global_batch", plan.batch.global_batch_size)
        trial.set_user_attr("measured_peak_bytes", peak)
        return {"throughput": throughput, "latency": step_time, "memory": float(peak),
                "pareto": (throughput, float(peak))}[self.settings.objective]

    def emit_best(self, plan: Plan, *, params: dict[str, Any]) -> None:
        """The compiler's files for the best plan (launch.sh, launch.sbatch, report.md,
        ds_config.json) in `<out>/best/`, so it can be launched as any compiled plan."""
        cfg = validate_config(apply(self.data, params), world_size=self.world_size)
        cluster = self.cluster.with_shape(nnodes=self.settings.nnodes, nproc_per_node=self.settings.nproc_per_node)
        emit(plan, config=cfg, model=self.model, cluster=cluster, out=self.settings.out_dir / "best",
             source=f"autotune trial {plan.provenance.trial_number}")

    def identity(self) -> dict[str, Any]:
        """What this tune measures (identity.py): the key of its study."""
        s = self.settings
        return study_identity(config=self.config, model=model_identity(s.workload, self.model), nnodes=s.nnodes,
                              nproc_per_node=s.nproc_per_node, cluster=self.cluster, dims=self.dims,
                              measurement={"objective": s.objective, "warm-up steps": s.warmup_steps,
                                           "measured steps": s.measured_steps,
                                           "memory safety margin": s.memory_safety_margin})

    @property
    def learning(self) -> bool:
        """Whether the cost model learns from the trials (a step-time objective, not the grid)."""
        s = self.settings
        return s.learn and s.objective in ("throughput", "latency") and s.sampler != "grid"

    def ranked(self) -> list[Ranked]:
        """Every distinct plan of the space (its first 2000 points: the cost model is cheap, not
        free) that compiles and fits, by the cost model's predicted seconds per sample."""
        if self._ranked is None:
            space = grid_space(self.dims)
            seen: dict[str, Ranked] = {}
            for values in islice(product(*space.values()), 2000):
                cand = self.candidate(dict(zip(space, values)))
                if cand.plan is not None and not cand.reason:
                    key = plan_key(cand.plan)
                    est = cand.plan.estimates
                    seen.setdefault(key, Ranked(key, cand.params, dict(est.step_time_breakdown_s),
                                                cand.plan.batch.global_batch_size))
            self._ranked = sorted(seen.values(), key=lambda r: r.seconds_per_sample(LearnedCost()))
        return self._ranked

    def warm_start(self, study: optuna.Study, *, budget: int) -> int:
        """Enqueue the cost model's best candidates into a new study, at most `budget` (the
        trials this run will run: a surplus would linger as WAITING trials); returns how many.
        When the cost model learns, only its best one: `after_trial` picks each next one from
        the model refitted to the trials before it.

        Not for the grid sampler: it runs every candidate anyway, and Optuna's GridSampler does
        not count an enqueued trial as a grid point (it would run it again, and fails outright
        on a one-point grid)."""
        wanted = min(1 if self.learning else self.settings.warm_start, budget)
        if study.trials or not self.dims or wanted <= 0 or self.settings.sampler == "grid":
            return 0
        chosen = self.ranked()[:wanted]
        for r in chosen:
            with experimental_ok():
                study.enqueue_trial(r.params, skip_if_exists=True)
        return len(chosen)

    def learned(self, study: optuna.Study) -> LearnedCost:
        """The cost model refitted to the study's measured trials (learned_cost.py)."""
        return fit(observations(measured_trials(study)))

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """After a completed trial (an Optuna callback), enqueue the plan the refitted cost model
        picks (learned_cost.next_plan), if any; else the sampler picks the next trial."""
        if not self.learning or trial.state != optuna.trial.TrialState.COMPLETE:
            return
        chosen = next_plan(study, ranked=self.ranked(), warm_start=self.settings.warm_start,
                           max_trials=self.settings.max_trials)
        if chosen is not None:
            with experimental_ok():
                study.enqueue_trial(chosen.params, skip_if_exists=True)


OWNER_POLL_S = 0.5
"""How often a trial waiting for another worker's measurement of its plan looks again."""


def _plan_owner(study: optuna.Study, *, key: str, before: int) -> optuna.trial.FrozenTrial | None:
    """The trial that measured the plan `key` (complete, not itself a reuse), else the
    lowest-numbered trial before `before` that carries it and is still running."""
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING))
    mine = [t for t in trials if t.user_attrs.get("plan_key") == key and "duplicate_of" not in t.user_attrs]
    done = [t for t in mine if t.state == optuna.trial.TrialState.COMPLETE]
    running = [t for t in mine if t.state == optuna.trial.TrialState.RUNNING and t.number < before]
    return min(done or running, key=lambda t: t.number, default=None)


def tune(*, data: dict, model: ModelSpec, cluster: ClusterSpec, settings: TuneSettings,
         callbacks: list[Callable] | None = None, launcher: Launcher | None = None,
         notify: Callable[[str], None] | None = None) -> TuneResult:
    """Run (or resume) the study and write the best plan; see the module docstring.

    `notify` gets a notice as it happens (a new study opened beside one of another identity);
    by default it is a ConfigWarning."""
    tuner = Tuner(data=data, model=model, cluster=cluster, settings=settings, launcher=launcher)
    study = open_tuner_study(tuner, notify=notify)
    fail_orphaned_trials(study)
    remaining = settings.max_trials - len([t for t in study.trials if t.state.is_finished()])
    tuner.warm_start(study, budget=remaining)
    # Other workers may share the study: the budget is the study's, counted after each trial.
    callbacks = [*(callbacks or []), tuner.after_trial,
                 optuna.study.MaxTrialsCallback(settings.max_trials, states=FINISHED)]
    if remaining > 0:
        study.optimize(tuner.objective, n_trials=remaining, timeout=settings.timeout_s,
                       catch=(TrialFailed,), callbacks=callbacks)
        _run_retries(study, objective=tuner.objective, callbacks=callbacks, limit=settings.max_trials)
    return tune_results(study, tuner=tuner)


def open_tuner_study(tuner: Tuner, *, notify: Callable[[str], None] | None = None) -> optuna.Study:
    """The study of what `tuner` measures, resumed or created (the one every worker joins)."""
    settings = tuner.settings
    if not tuner.dims:
        raise ConfigError("nothing to tune: no knob is 'auto' and autotuning.space is empty; "
                          "set e.g. zero_optimization.stage or train_micro_batch_size_per_gpu to \"auto\"")
    storage = storage_url(settings.storage, results_dir=settings.out_dir)
    return open_identified_study(storage=storage, given_name=settings.study_name, overwrite=settings.overwrite,
                                 identity=tuner.identity(), directions=directions(settings.objective),
                                 sampler=make_sampler(settings.sampler, dims=tuner.dims, seed=settings.seed),
                                 pruner=make_pruner(settings.pruner), notify=notify or _warn,
                                 heartbeat_s=settings.heartbeat_s)


def tune_results(study: optuna.Study, *, tuner: Tuner) -> TuneResult:
    """Write the study's results and the best plan's files into the results directory; also
    what any worker of a shared study renders once the trials are done."""
    settings = tuner.settings
    best = write_results(study, out_dir=settings.out_dir, objective=settings.objective)
    if best is not None:
        tuner.emit_best(best, params=study.trials[best.provenance.trial_number].params)
    states = [t.state.name.lower() for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    return TuneResult(study, best, settings.out_dir, {s: states.count(s) for s in set(states)})


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _run_retries(study: optuna.Study, *, objective: Callable, callbacks: list[Callable], limit: int) -> None:
    """Run the trials enqueued again for a dead worker (RetryHeartbeatStaleTrialCallback, storage.py)
    that are still waiting: the grid sampler stops a worker once every point has been taken,
    which would leave such a retry behind with no worker to take it."""
    for _ in range(limit):
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if not any("failed_trial" in t.system_attrs for t in waiting):
            return
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)


def _warn(text: str) -> None:
    warnings.warn(ConfigWarning(text), stacklevel=3)
