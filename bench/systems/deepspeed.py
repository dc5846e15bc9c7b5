"""DeepSpeed at ZeRO stage 0-3 and with optimizer offload to CPU, configured by zeroplan's own
`ds_config` emitter from the very plan zeroplan runs, so both get the same batch, buckets,
clip, optimizer hyper-parameters and offload target. Optional: only when `deepspeed` imports;
its ranks run with DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo without oneCCL).

The optimizer is DeepSpeed's own choice for `"optimizer": {"type": "AdamW"}`, as a user
gets it: FusedAdam (its CPU build) without offload, DeepSpeedCPUAdam (the AVX C++ Adam)
with `offload_optimizer: cpu`; both are JIT-built into ~/.cache/torch_extensions on first
use (minutes, once). The update is AdamW's in both; the losses are checked against DDP's.

Installing the peer (never a dependency of the product; a separate venv keeps it apart):

    python3 -m venv /work/dsvenv
    /work/dsvenv/bin/pip install torch==2.13.0 -c constraints/cpu.txt   # the CPU wheel
    /work/dsvenv/bin/pip install deepspeed -c constraints/cpu.txt       # 0.19.x
    /work/dsvenv/bin/pip install -e . -c constraints/cpu.txt
    DS_ACCELERATOR=cpu /work/dsvenv/bin/python -c \
        "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"  # ~3 min
    /work/dsvenv/bin/python -m bench ...

(pip install deepspeed pulls py-cpuinfo, ninja, psutil, hjson, pydantic, msgpack, einops;
the constraints file keeps pip from replacing the CPU torch with a CUDA build.)"""

from __future__ import annotations

import functools
import os

from torch import nn

from ..workload import Workload, compile_plan
from .base import System, engine_train_step, stage_variant


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
    offload: str = "none"

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

        config = ds_config(compile_plan(workload, stage=self.stage, offload=self.offload))
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def train_step(self, micro_batches):
        return engine_train_step(self.engine, micro_batches)

    def close(self) -> None:
        destroy = getattr(self.engine, "destroy", None)  # DeepSpeed >= 0.14
        if destroy is not None:
            destroy()


def _stage(stage: int, offload: str = "none") -> type[DeepSpeed]:
    return stage_variant(DeepSpeed, prefix="deepspeed", stage=stage, offload=offload)


STAGES = [_stage(s) for s in range(4)]
OFFLOAD = [_stage(s, "cpu") for s in range(1, 4)]
"""ZeRO-Offload (stages 1-2) and ZeRO-3 with the optimizer on the CPU; DeepSpeed refuses
offload at stage 0. NVMe offload needs DeepSpeed's async_io op (libaio) and is not run."""
