"""`autotuning` block: zeroplan's search settings and per-knob ranges.

A knob is a dotted config key the tuner may choose. It becomes a search dimension when the
config gives it as "auto", or when `autotuning.space` gives it a range:

    "space": {"zero_optimization.stage": {"choices": [1, 2, 3]},
              "train_micro_batch_size_per_gpu": {"low": 1, "high": 64, "log": true}}
"""

import difflib
from typing import Any

from pydantic import model_validator

from .errors import Problem, raise_problems
from .knobs import DEVICES, TUNABLE
from .types import Flag, Positive, StrictModel, choice, count, real

SAMPLERS = ("tpe", "random", "grid", "nsga2")
"""Optuna samplers by name (autotune/study.py builds each): TPE, random, an exhaustive grid over
the dimensions, NSGA-II (for the two-valued `pareto` objective)."""
PRUNERS = ("median", "hyperband", "none")
"""Optuna pruners by name (autotune/study.py builds each)."""
OBJECTIVES: dict[str, tuple[tuple[str, str], ...]] = {
    "throughput": (("maximize", "samples/s"),),
    "latency": (("minimize", "step time (s)"),),
    "memory": (("minimize", "peak bytes/rank"),),
    "pareto": (("maximize", "samples/s"), ("minimize", "peak bytes/rank")),
}
"""What the tuner can optimise: per name, each value a trial reports, as (Optuna direction, what
it measures). `pareto` is a multi-objective study over throughput and peak memory."""


def directions(objective: str) -> list[str]:
    """The Optuna study directions of `objective`, one per value a trial reports."""
    return [direction for direction, _ in OBJECTIVES[objective]]



class KnobRange(StrictModel):
    """Either `choices` or an interval `low`..`high` (optionally log-spaced, or stepped)."""

    choices: list[Any] | None = None
    """The values to search, in order (a categorical dimension)."""
    low: real() | None = None
    """Lower end of the interval, inclusive."""
    high: real() | None = None
    """Upper end of the interval, inclusive."""
    log: Flag = False
    """Sample the interval on a log scale (needs low > 0)."""
    step: real(gt=0) | None = None
    """Spacing of the values in the interval; None lets integer knobs take every integer."""

    @model_validator(mode="after")
    def _shape(self) -> "KnobRange":
        problems = []
        has_interval = self.low is not None or self.high is not None
        if self.choices is not None and has_interval:
            problems.append(Problem("", "give either choices or low/high, not both"))
        elif self.choices is not None and not self.choices:
            problems.append(Problem("choices", "must list at least one value", given=[]))
        elif self.choices is None and (self.low is None or self.high is None):
            problems.append(Problem("", "needs choices, or both low and high"))
        elif self.choices is None and self.low > self.high:
            problems.append(Problem("low", f"low ({self.low:g}) > high ({self.high:g})", given=self.low))
        elif self.log and self.choices is None and self.low <= 0:
            problems.append(Problem("low", "a log range needs low > 0", given=self.low))
        raise_problems(problems)
        return self


def _knob_problems(path: str, kind: str, knob: KnobRange) -> list[Problem]:
    where = f"space.{path}"
    if kind == "bool":
        if knob.choices is None or any(not isinstance(c, bool) for c in knob.choices):
            return [Problem(where, "takes choices of true/false", given=knob.choices)]
    elif kind == "device":
        if knob.choices is None or any(c not in DEVICES for c in knob.choices):
            return [Problem(where, "takes choices among 'none', 'cpu', 'nvme'", given=knob.choices)]
    elif knob.choices is not None:
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in knob.choices):
            return [Problem(where, "takes choices of non-negative integers", given=knob.choices)]
    elif knob.low != int(knob.low) or knob.high != int(knob.high) or knob.low < 0:
        return [Problem(where, "takes integer bounds >= 0", given=[knob.low, knob.high])]
    return []


class AutotuningConfig(StrictModel):
    enabled: Flag = False
    """Informational: `zeroplan autotune` tunes whether or not this is set."""
    metric: choice(*OBJECTIVES) = "throughput"
    """What the tuner optimises: samples/s (max), step time (min), peak memory (min), or 'pareto':
    both samples/s and peak memory (a front of plans; `sampler: nsga2` suits it)."""
    max_trials: Positive = 20
    """Trials to run at most (pruned and skipped trials count)."""
    time_budget_s: real(gt=0) | None = None
    """Wall-clock budget in seconds for the whole study; None means no limit."""
    warmup_steps: count(ge=0) = 2
    """Steps run before timing starts in each trial."""
    measured_steps: Positive = 5
    """Timed steps per trial."""
    trial_timeout_s: real(gt=0) = 600.0
    """A trial running longer than this is killed and recorded as failed."""
    sampler: choice(*SAMPLERS) = "tpe"
    """Optuna sampler."""
    pruner: choice(*PRUNERS) = "median"
    """Optuna pruner that stops hopeless trials from their reported step times."""
    storage: str | None = None
    """Optuna storage URL; None means a SQLite file in results_dir (shared DBs scale out)."""
    study_name: str | None = None
    """Study name; None derives one from the config hash."""
    results_dir: str = "autotuning_results"
    """Directory for the study database, trial logs and the best plan."""
    overwrite: Flag = False
    """Start a fresh study instead of resuming one of the same name."""
    memory_safety_margin: real(ge=0, le=0.9) = 0.1
    """Fraction of device memory the memory model must leave free for a candidate to run."""
    seed: count(ge=0) | None = None
    """Sampler seed, for reproducible searches."""
    space: dict[str, KnobRange] = {}
    """Ranges by dotted knob key; see `schemas.knobs.KNOBS` for the knobs."""

    @model_validator(mode="after")
    def _knobs(self) -> "AutotuningConfig":
        problems = []
        for path, knob in self.space.items():
            kind = TUNABLE.get(path)
            if kind is None:
                close = difflib.get_close_matches(path, TUNABLE, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.append(Problem(f"space.{path}", "is not a tunable knob",
                                        suggestion=hint + "tunable: " + ", ".join(TUNABLE)))
            else:
                problems += _knob_problems(path, kind, knob)
        raise_problems(problems)
        return self
