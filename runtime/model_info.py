"""The model-info run: one run of a training script that only measures its model.

`zeroplan autotune --script train.py` first runs the script once, one process, to learn the
model's shape (DeepSpeed's autotuner starts with the same "model info" experiment):

    python -m zeroplan.runtime.rank --model-info model_spec.json train.py ARGS

That entry point (rank.py) calls `request(output)` before it runs the script, and only then
does `zeroplan.initialize(model)` return a `ModelInfoRun` instead of an Engine. The request
lives in this process alone: nothing the script starts inherits it, and no environment
variable changes what `initialize` returns.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from zeroplan.schemas.atomic import atomic_write_text

from .metrics import TrialComplete
from .user_model import measure_spec

_output: Path | None = None


def request(output: Path) -> None:
    """Make this process's `initialize` calls measure the model into `output` (rank.py's --model-info)."""
    global _output
    _output = Path(output)


def requested() -> Path | None:
    """Where this process's model-info run writes the spec; None in every other run."""
    return _output


class ModelInfoRun:
    """What `zeroplan.initialize` returns in the model-info run (see the module docstring).

    The script's first forward (`engine(batch)` or `engine.train_batch(it)`) measures the
    model with that batch, writes the ModelSpec to `output`, and ends the run with
    TrialComplete (exit status 0); nothing is trained.
    """

    def __init__(self, model: nn.Module, *, output: Path):
        self.module, self.output = model, output

    def __call__(self, *args, **kwargs):
        name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else type(self.module).__name__
        spec = measure_spec(self.module, sample=(args, kwargs), name=name)
        atomic_write_text(self.output, spec.model_dump_json(indent=2) + "\n")
        raise TrialComplete(0)

    forward = __call__

    def train(self, mode: bool = True) -> "ModelInfoRun":
        """The model's mode, as engine.train() sets it before a first forward."""
        self.module.train(mode)
        return self

    def eval(self) -> "ModelInfoRun":
        return self.train(False)

    def train_micro_batch_size_per_gpu(self) -> int:
        return 1

    def gradient_accumulation_steps(self) -> int:
        return 1

    def train_batch(self, data_iter: Iterator) -> None:
        batch = next(data_iter)
        if isinstance(batch, dict):
            self(**batch)
        elif isinstance(batch, (list, tuple)):
            self(*batch)
        self(batch)

    def __getattr__(self, name: str):
        raise AttributeError(f"engine.{name} before the first forward: the model-info run of `zeroplan autotune "
                             "--script` ends at the first forward (engine(batch) or engine.train_batch)")
