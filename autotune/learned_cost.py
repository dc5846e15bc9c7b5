"""A cost model that learns from the trials: the compiler's step-time terms, refitted to what
this machine measures for this model.

The compiler predicts a step as a sum of terms (compiler/cost.py: compute, pipeline bubble,
exposed communication per parallel dimension, optimizer step, offload traffic, per-micro-step
and per-block framework overhead, gradient copies), each from the cluster's rates. Those rates
come from `zeroplan probe`, which times the built-in GPT; another model has other overheads,
so a prediction can be several times off and, worse, rank the candidates wrongly when one term
is further off than another. So after every completed trial each term's scale s_k (its prior:
1.0, the rates as given) is refitted on the trials measured so far:

    minimise  sum_i ((sum_k s_k x_ik + c - y_i) / y_i)^2
              + PRIOR * sum_k (s_k - 1)^2 + STEP_PRIOR * (c / mean_i y_i)^2,    s_k >= 0, c >= 0

x_ik is term k of trial i's plan, y_i its measured step seconds, c a per-step constant that no
term models (prior 0 s). Residuals are relative, so a slow trial does not outweigh a fast one.
With no trial the fit is the cost model itself. A single trial cannot tell its terms apart: the
ridge toward the prior gives each term a share of the correction in proportion to its share of
the prediction, and terms no trial has exercised keep the probe's figure. `STEP_PRIOR` is
strong, so the constant takes only what the terms cannot explain: a constant shifts every
candidate alike and never changes their order.

Torch-free and cheap (a least-squares solve of a dozen unknowns), so the tuner refits after
every trial and `next_plan` says which plan to try next (tune.py's `Tuner.after_trial`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from zeroplan.compiler.flops import peak_flops, step_flops
from zeroplan.schemas import ClusterSpec, ModelSpec

PRIOR = 0.002
"""Weight of each scale's pull toward 1.0, against squared relative errors of the trials. Small:
a trial whose prediction is 3x off moves the scales of the terms that make up most of it most of
the way at once; a term that is a small share of every trial's step stays nearer its prior
until enough trials exercise it."""
STEP_PRIOR = 1.0
"""Weight of the per-step constant's pull toward 0 s, relative to the mean measured step."""


@dataclass(frozen=True)
class Observation:
    """One measured plan: its predicted terms (seconds per step) and the measured step seconds."""

    terms: Mapping[str, float]
    measured_s: float


@dataclass(frozen=True)
class LearnedCost:
    """Per-term scales and a per-step constant; `predict` applies them to a plan's terms."""

    scales: Mapping[str, float] = field(default_factory=dict)
    """Term -> fitted scale; a term not named keeps its prior, 1.0."""
    per_step_s: float = 0.0
    trials: int = 0
    """How many measured plans the fit saw (0: the cost model as it is)."""

    def predict(self, terms: Mapping[str, float]) -> float:
        """Predicted step seconds of a plan with these terms."""
        return sum(self.scales.get(name, 1.0) * seconds for name, seconds in terms.items()) + self.per_step_s


def fit(observations: Sequence[Observation], *, prior: float = PRIOR, step_prior: float = STEP_PRIOR) -> LearnedCost:
    """The regularised least-squares fit of the module docstring (non-negative: a coefficient
    the unconstrained solve makes negative is fixed at 0 and the rest solved again)."""
    usable = [o for o in observations if o.measured_s > 0]
    if not usable:
        return LearnedCost()
    names = sorted({name for o in usable for name, seconds in o.terms.items() if seconds > 0})
    y = np.array([o.measured_s for o in usable])
    x = np.array([[o.terms.get(name, 0.0) for name in names] + [1.0] for o in usable])
    n = len(names)
    data_rows, data_target = x / y[:, None], np.ones(len(usable))
    prior_rows = np.zeros((n + 1, n + 1))
    prior_rows[:n, :n] = np.sqrt(prior) * np.eye(n)
    prior_rows[n, n] = np.sqrt(step_prior) / float(y.mean())
    prior_target = np.concatenate([np.full(n, np.sqrt(prior)), [0.0]])
    a, b = np.vstack([data_rows, prior_rows]), np.concatenate([data_target, prior_target])
    free = list(range(n + 1))
    coef = np.zeros(n + 1)
    while free:
        solved, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        coef = np.zeros(n + 1)
        coef[free] = solved
        if solved.min() >= 0:
            break
        free.remove(free[int(np.argmin(solved))])
    return LearnedCost(scales={name: float(s) for name, s in zip(names, coef[:n])}, per_step_s=float(coef[n]),
                       trials=len(usable))


def relative_error(*, predicted_s: float, measured_s: float) -> float:
    """(predicted - measured) / measured: negative when the model is optimistic."""
    return (predicted_s - measured_s) / measured_s


def overhead_prior(cluster: ClusterSpec, model: ModelSpec, *, micro_step_s: float) -> ClusterSpec:
    """`cluster` with its per-micro-step and per-block overheads rescaled so the cost model's
    micro-step of `model` at micro-batch 1 (matmul time plus those overheads) takes
    `micro_step_s`, the model-info run's timing of one forward + backward (autotune/models.py):
    the prior the learned model starts from for a model the probe did not time. Only on CPU
    clusters, where that timing ran on the device the ranks train on; when the matmul time alone
    exceeds the timing, the overheads are left as they are."""
    rates = cluster.rates
    if cluster.device != "cpu":
        return cluster
    compute = step_flops(model, tokens=model.seq_len, layers=model.layers, head=True).total / peak_flops(
        cluster, dtype=model.dtype)
    overhead = rates.micro_step_overhead + model.layers * rates.layer_overhead
    left = micro_step_s - compute
    if left <= 0:
        return cluster
    if overhead > 0:
        update = {"micro_step_overhead": rates.micro_step_overhead * left / overhead,
                  "layer_overhead": rates.layer_overhead * left / overhead}
    else:  # nothing to scale: split it as one block's worth per block and one for the step
        update = {"micro_step_overhead": left / (model.layers + 1), "layer_overhead": left / (model.layers + 1)}
    return cluster.model_copy(update={"rates": rates.model_copy(update=update)})


@dataclass(frozen=True)
class Ranked:
    """A distinct plan of the search space, as the warm start and the learned model rank it."""

    key: str
    """tune.plan_key of the plan."""
    params: dict[str, Any]
    terms: dict[str, float]
    """The cost model's step-time terms (Plan.estimates.step_time_breakdown_s)."""
    global_batch: int

    def seconds_per_sample(self, model: LearnedCost) -> float:
        return model.predict(self.terms) / self.global_batch


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials that measured their plan themselves (not a reuse) and carry its terms
    (the user attributes tune.py records)."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "duplicate_of" not in t.user_attrs and "measured_step_time_s" in t.user_attrs
            and "predicted_terms" in t.user_attrs]


def observations(trials: Sequence[optuna.trial.FrozenTrial]) -> list[Observation]:
    """What the fit reads of `measured_trials`."""
    return [Observation(t.user_attrs["predicted_terms"], t.user_attrs["measured_step_time_s"]) for t in trials]


def next_plan(study: optuna.Study, *, ranked: Sequence[Ranked], warm_start: int, max_trials: int) -> Ranked | None:
    """The plan to enqueue after a completed trial, or None (the sampler picks).

    The model refitted to every measured trial picks the best plan no trial has taken yet; it
    is tried while the warm start lasts (the first `warm_start` trials), and after it when its
    prediction, less the model's own median error so far (`model_error`), beats the best
    measured seconds per sample. Enqueuing rather than biasing
    the sampler keeps the two apart: the sampler's history stays the trials' own values, and
    a model that is wrong costs one trial, after which it is refitted to that trial. One is
    queued at a time, and none beyond `max_trials` (it would linger as a WAITING trial)."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    if any(t.state == optuna.trial.TrialState.WAITING for t in trials) or len(finished) >= max_trials:
        return None
    taken = {t.user_attrs.get("plan_key") for t in trials}
    untried = [r for r in ranked if r.key not in taken]
    if not untried:
        return None
    measured = measured_trials(study)
    learned = fit(observations(measured))
    best = min(untried, key=lambda r: r.seconds_per_sample(learned))
    done = [t.user_attrs["measured_step_time_s"] / t.user_attrs["global_batch"] for t in measured
            if "global_batch" in t.user_attrs]
    optimistic = best.seconds_per_sample(learned) * (1 - model_error(measured))
    if len(finished) < warm_start or (done and optimistic < min(done)):
        return best
    return None


def model_error(trials: Sequence[optuna.trial.FrozenTrial]) -> float:
    """The median |relative error| of the learned model's predictions of these trials, each made
    before the trial ran (`learned_step_time_s`); 0 before any. A plan whose prediction is within
    that error of the best measured may still beat it."""
    errors = sorted(abs(relative_error(predicted_s=t.user_attrs["learned_step_time_s"],
                                       measured_s=t.user_attrs["measured_step_time_s"]))
                    for t in trials if "learned_step_time_s" in t.user_attrs)
    return min(errors[len(errors) // 2], 0.9) if errors else 0.0
