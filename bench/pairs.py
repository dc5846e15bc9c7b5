"""Interleaved pairs: how two systems compare on a shared, noisy machine.

A comparison is n pairs of fresh runs, A then B in even pairs and B then A in odd ones, so
neither always runs first; each pair gives one ratio, taken within the pair (both ran seconds
apart, under the same load). The result is the median ratio with a 90% percentile-bootstrap
interval of that median (10,000 resamples of the pair ratios, seeded, so a result file
reproduces from its ratios). An interval that holds 1.0 is "not separated": neither a win nor
a loss, whatever the median says. One pair has no spread to resample, so its interval is
unbounded: never separated.
"""

from __future__ import annotations

import math
import os
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
LEVEL = 0.90
RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    median: float
    low: float
    high: float

    @property
    def separated(self) -> bool:
        return not (self.low <= 1.0 <= self.high)

    def verdict(self, *, above: str, below: str) -> str:
        """`above` when the whole interval is above 1.0, `below` under it, else "not separated"."""
        if not self.separated:
            return "not separated"
        return above if self.low > 1.0 else below

    def text(self) -> str:
        if math.isinf(self.high):
            return f"{self.median:.2f}x (one pair: no interval)"
        return f"{self.median:.2f}x [{self.low:.2f}, {self.high:.2f}]"


def median_interval(ratios: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
                    seed: int = 0) -> Interval:
    """The median of `ratios` and its percentile-bootstrap interval at `level`."""
    if not ratios:
        raise ValueError("no ratios")
    if len(ratios) == 1:
        return Interval(median=ratios[0], low=0.0, high=math.inf)
    rng = random.Random(seed)
    n = len(ratios)
    medians = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2
    low = medians[int(tail * (resamples - 1))]
    high = medians[int((1.0 - tail) * (resamples - 1))]
    return Interval(median=statistics.median(ratios), low=low, high=high)


@dataclass
class Pairs:
    """The runs of an interleaved comparison, in pair order, with the load at each pair's start."""

    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    def ratios(self, value: Callable[[object], float], *, b_over_a: bool = False) -> list[float]:
        """value(a) / value(b) per pair (or b over a)."""
        return [value(y) / value(x) if b_over_a else value(x) / value(y) for x, y in zip(self.a, self.b)]


def interleave(run_a: Callable[[], T], run_b: Callable[[], T], *, pairs: int, log=None) -> Pairs:
    """`pairs` pairs of fresh runs, A B, B A, A B, ..."""
    out = Pairs()
    for i in range(pairs):
        out.load.append(os.getloadavg()[0])
        order = (("a", run_a), ("b", run_b)) if i % 2 == 0 else (("b", run_b), ("a", run_a))
        got = {}
        for name, run in order:
            if log:
                log(f"pair {i + 1}/{pairs}: {name}")
            got[name] = run()
        out.a.append(got["a"])
        out.b.append(got["b"])
    return out
