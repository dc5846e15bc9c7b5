"""What every system trains in a benchmark run: the model, data, batch and optimizer.

A `Workload` is plain data (JSON round trip), handed from the runner to every rank process.
Every system builds the same built-in GPT under the same seed (so every rank of every system
starts from identical weights), reads the same Markov-chain batches (`MarkovChainData`:
the global batch of step s depends only on the seed and s, each rank takes its fixed slice),
and steps AdamW with the same hyper-parameters and global-norm clip, no schedule.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS, ModelSpec, Plan, validate_config


@dataclass(frozen=True)
class Workload:
    preset: str = "small"
    """Built-in GPT preset (tiny, small, medium)."""
    world_size: int = 2
    micro_batch_size: int = 2
    """Samples per rank per forward."""
    accumulation: int = 1
    steps: int = 8
    """Optimizer steps per run; the first `warmup` are not timed."""
    warmup: int = 2
    seed: int = 0
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    activation_checkpointing: bool = False
    """zeroplan's plans recompute each block in backward (the other systems ignore it)."""
    profile: bool = False
    """After the timed steps, every rank runs one more step under torch.profiler and reports
    where its time went (bench/step_profile.py); the timed steps are not profiled."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def spec(self) -> ModelSpec:
        return MODEL_PRESETS[self.preset]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        data = json.loads(text)
        data["betas"] = tuple(data["betas"])
        return cls(**data)


def train_config(workload: Workload, *, stage: int, offload: str = "none") -> dict:
    """The DeepSpeed-style config of `workload` at ZeRO `stage` (bucket sizes left to the compiler)."""
    zero: dict = {"stage": stage}
    if offload != "none":
        zero["offload_optimizer"] = {"device": offload}
    return {
        "train_micro_batch_size_per_gpu": workload.micro_batch_size,
        "gradient_accumulation_steps": workload.accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": workload.lr, "betas": list(workload.betas),
                                                  "eps": workload.eps, "weight_decay": workload.weight_decay}},
        "gradient_clipping": workload.clip,
        "zero_optimization": zero,
        "activation_checkpointing": {"enabled": workload.activation_checkpointing},
    }


def compile_plan(workload: Workload, *, stage: int, offload: str = "none") -> Plan:
    """zeroplan's Plan for `workload` on `world_size` CPU ranks (the `cpu` cluster preset)."""
    from zeroplan.compiler import compile as compile_config

    config = validate_config(train_config(workload, stage=stage, offload=offload), source="bench workload")
    return compile_config(config, workload.spec, CLUSTER_PRESETS["cpu"], nproc_per_node=workload.world_size)
