"""DeepSpeed at ZeRO stage 0-3, configured by zeroplan's own `ds_config` emitter from the very
plan zeroplan runs, so both get the same batch, buckets, clip and optimizer. Optional: only
when `deepspeed` imports (the `bench` extra); its ranks run with DS_ACCELERATOR=cpu."""

from __future__ import annotations

import functools
import os

from torch import nn

from ..workload import Workload, compile_plan
from .base import System, engine_train_step


@functools.cache
def _import_error() -> str | None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # not installed, or it fails to import on this machine
        return f"deepspeed is not importable ({type(e).__name__}: {e}); install the `bench` extra to compare"
    return None


class DeepSpeed(System):
    stage: int

    @classmethod
    def unavailable(cls) -> str | None:
        return _import_error()

    @classmethod
    def env(cls) -> dict[str, str]:
        return {"DS_ACCELERATOR": "cpu"}

    @classmethod
    def version(cls) -> str:
        import deepspeed

        return deepspeed.__version__

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        import deepspeed

        from zeroplan.compiler.deepspeed import ds_config

        config = ds_config(compile_plan(workload, stage=self.stage))
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def train_step(self, micro_batches):
        return engine_train_step(self.engine, micro_batches)

    def close(self) -> None:
        destroy = getattr(self.engine, "destroy", None)  # DeepSpeed >= 0.14
        if destroy is not None:
            destroy()


def _stage(stage: int) -> type[DeepSpeed]:
    return type(f"DeepSpeedZ{stage}", (DeepSpeed,), {"name": f"deepspeed-z{stage}", "stage": stage,
                                                       "sharding": f"stage {stage}"})


STAGES = [_stage(s) for s in range(4)]
