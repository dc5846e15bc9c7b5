"""A wall-clock budget shared by the sections of `python -m bench`."""

from __future__ import annotations

import time

from zeroplan.schemas import MODEL_PRESETS


class Budget:
    """Seconds left until a deadline; `fits(cost)` says whether a job of `cost` seconds ends in time."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    @property
    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def fits(self, cost: float) -> bool:
        return cost <= self.remaining


def work_per_sample(preset: str) -> float:
    """Relative training work of one sample: parameters x tokens (6ND, Kaplan et al. 2020) plus
    the attention scores (~ layers x seq^2 x hidden), in the same units across presets."""
    spec = MODEL_PRESETS[preset]
    return spec.total_params * spec.seq_len + spec.layers * spec.seq_len ** 2 * spec.hidden


STARTUP_S = 8.0
"""Seconds a measurement spends outside its steps on this machine (interpreter, torch import,
process group, model build), measured on the tiny preset."""
