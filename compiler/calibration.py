"""Measured corrections to the memory model, fed back from profiled runs.

The analytic model (memory.py) counts tensors; a real process also holds allocator slack,
library workspaces and temporaries it does not see. A calibration file says, per category,
how to turn the analytic figure into the measured one:

    {"source": "bench/results/h100_gpt_medium.json",
     "device": {"activations": {"scale": 1.18}, "overhead": {"offset_bytes": 734003200}},
     "host": {"optimizer_states": {"scale": 1.02}}}

predicted = analytic * scale + offset_bytes. Categories not named are left unchanged; a
category the model does not know is an error, so a typo cannot silently do nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zeroplan.schemas import ConfigError, Problem

DEVICE_CATEGORIES = ("parameters", "gradients", "optimizer_states", "master_weights", "activations",
                     "comm_buffers", "overhead")
"""Per-rank device memory, by what holds it."""
HOST_CATEGORIES = ("parameters", "gradients", "optimizer_states", "master_weights", "activations",
                   "swap_buffers")
"""Per-rank host memory of offloaded state."""


class Correction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(default=1.0, ge=0)
    offset_bytes: int = 0
    """Added after scaling; may be negative (the result is clamped at 0)."""

    def apply(self, value: int) -> int:
        return max(int(round(value * self.scale)) + self.offset_bytes, 0)


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = ""
    """Where the measurements came from (a results file, a run id)."""
    device: dict[str, Correction] = {}
    host: dict[str, Correction] = {}

    @model_validator(mode="after")
    def _known(self) -> "Calibration":
        problems = [Problem(f"{where}.{name}", "is not a memory category", suggestion="categories: " + ", ".join(known))
                    for where, known, given in (("device", DEVICE_CATEGORIES, self.device),
                                                ("host", HOST_CATEGORIES, self.host))
                    for name in sorted(set(given) - set(known))]
        if problems:
            raise ConfigError(problems)
        return self

    def apply(self, device: dict[str, int], host: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
        """Corrected copies of the analytic per-rank figures."""
        fixed_device = {k: self.device[k].apply(v) if k in self.device else v for k, v in device.items()}
        fixed_host = {k: self.host[k].apply(v) if k in self.host else v for k, v in host.items()}
        return fixed_device, fixed_host

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read a calibration file, or ConfigError naming the file."""
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except OSError as e:
            raise ConfigError(Problem("", f"cannot read calibration: {e.strerror}"), source=str(path)) from e
        except ConfigError as e:
            raise ConfigError(e.problems, source=str(path)) from e
        except (ValueError, ValidationError) as e:
            inner = getattr(e, "errors", None)
            nested = [err.get("ctx", {}).get("error") for err in inner()] if callable(inner) else []
            if nested and all(isinstance(n, ConfigError) for n in nested):
                raise ConfigError([p for n in nested for p in n.problems], source=str(path)) from e
            raise ConfigError(Problem("", f"not a valid calibration: {' '.join(str(e).split())[:400]}"),
                              source=str(path)) from e
