"""`TrainConfig`: the whole training config, with DeepSpeed's key names.

An existing `ds_config.json` validates as it is. Every block forbids unknown keys; keys that
DeepSpeed defines but zeroplan does not use are accepted by the loader with one notice each
(see `deepspeed_keys.py`), before this model sees the data.

Cross-field rules live on the block they concern, so a block's rules are checked even when a
sibling block has errors; the rules below span blocks and run once every field is valid.
"""

from pydantic import Field, ValidationInfo, model_validator

from .autotuning import AutotuningConfig
from .batch import batch_problems
from .failures import FailuresConfig
from .errors import ConfigError, Problem, raise_problems
from .monitors import (
    ActivationCheckpointingConfig,
    AioConfig,
    CheckpointConfig,
    CompileConfig,
    CometConfig,
    CommsLoggerConfig,
    CsvMonitorConfig,
    FlopsProfilerConfig,
    TensorboardConfig,
    WandbConfig,
)
from .optim import OptimizerConfig, ParamGroupsConfig, SchedulerConfig
from .parallel import ParallelConfig, TensorParallelConfig, derive_degrees
from .precision import Bf16Config, Fp16Config
from .types import AutoPositive, Flag, Positive, StrictModel, choice, is_auto, real
from .zero import ZeroConfig


class TrainConfig(StrictModel):
    """A training config. Field names and defaults are DeepSpeed's unless marked zeroplan's."""

    train_batch_size: AutoPositive | None = None
    """Global batch: samples per optimizer step over all dp ranks."""
    train_micro_batch_size_per_gpu: AutoPositive | None = None
    """Micro-batch: samples per rank per forward."""
    gradient_accumulation_steps: AutoPositive | None = None
    """Micro-batches accumulated per optimizer step."""
    optimizer: OptimizerConfig | None = None
    """None: the training script brings its own optimizer (zeroplan then uses AdamW defaults)."""
    scheduler: SchedulerConfig | None = None
    """None: constant learning rate."""
    param_groups: ParamGroupsConfig = ParamGroupsConfig()
    """zeroplan's: weight decay by parameter name and parameters without gradients."""
    fp16: Fp16Config = Fp16Config()
    """fp16 mixed precision with dynamic loss scaling (DeepSpeed's `fp16` block)."""
    bf16: Bf16Config = Bf16Config()
    """bf16 mixed precision, no loss scaling (DeepSpeed's `bf16` block)."""
    gradient_clipping: real(ge=0, auto=True) = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    communication_data_type: choice("fp32", "fp16", "bf16") | None = None
    """Dtype of gradient collectives; None uses the parameters' dtype."""
    prescale_gradients: Flag = False
    """Divide gradients by the dp degree before (rather than after) the reduction."""
    gradient_predivide_factor: real(gt=0) = 1.0
    """Divide gradients by this factor before the reduction and the rest after."""
    steps_per_print: Positive = 10
    """Log training progress every N optimizer steps."""
    wall_clock_breakdown: Flag = False
    """Time forward, backward and step separately."""
    zero_optimization: ZeroConfig = ZeroConfig()
    """ZeRO sharding of optimizer states, gradients and parameters, its buckets and offload."""
    activation_checkpointing: ActivationCheckpointingConfig = ActivationCheckpointingConfig()
    """Recompute activations in backward to save memory."""
    parallel: ParallelConfig = ParallelConfig()
    """zeroplan's dp/tp/pp degrees."""
    tensor_parallel: TensorParallelConfig = TensorParallelConfig()
    """DeepSpeed's AutoTP block; autotp_size is read as parallel.tp."""
    tensorboard: TensorboardConfig = TensorboardConfig()
    """TensorBoard event files of the training metrics, written by rank 0."""
    csv_monitor: CsvMonitorConfig = CsvMonitorConfig()
    """CSV files of the training metrics, written by rank 0."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases logging of the training metrics, from rank 0."""
    comet: CometConfig = CometConfig()
    """DeepSpeed's Comet monitor; accepted and validated, zeroplan writes no Comet experiment (one notice)."""
    comms_logger: CommsLoggerConfig = CommsLoggerConfig()
    """Log and profile the collectives each step (DeepSpeed's communication logger)."""
    flops_profiler: FlopsProfilerConfig = FlopsProfilerConfig()
    """Count one optimizer step's FLOPs and report them with MFU."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint saving and loading options."""
    aio: AioConfig = AioConfig()
    """Asynchronous I/O for NVMe offload."""
    compile: CompileConfig = CompileConfig()
    """DeepSpeed's DeepCompile settings; validated, not acted on (one notice)."""
    autotuning: AutotuningConfig = AutotuningConfig()
    """zeroplan's tuner settings for `zeroplan autotune` (DeepSpeed's block, with Optuna's terms)."""
    failures: FailuresConfig = FailuresConfig()
    """zeroplan's: the collective timeout and what a non-finite step does."""
    json_schema: str | None = Field(default=None, alias="$schema")
    """Editor hint (`"$schema": "..."`); ignored."""

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> "TrainConfig":
        world_size = (info.context or {}).get("world_size")
        problems, dp = self._degree_problems(world_size)
        problems += batch_problems(self.train_batch_size, self.train_micro_batch_size_per_gpu,
                                   self.gradient_accumulation_steps, dp=dp)
        if self.fp16.enabled is True and self.bf16.enabled is True:
            problems.append(Problem("bf16.enabled", "fp16 and bf16 cannot both be enabled",
                                    given=True, suggestion="set fp16.enabled or bf16.enabled to false"))
        problems += self._tp_problems()
        stage = self.zero_optimization.stage
        if self.fp16.fp16_master_weights_and_grads and stage == 0:
            problems.append(Problem("fp16.fp16_master_weights_and_grads", "needs a ZeRO stage >= 1, as DeepSpeed "
                                    "asserts, but stage is 0", given=True,
                                    suggestion="set it to false, or zero_optimization.stage to 1, 2 or 3"))
        raise_problems(problems)
        return self

    def _degree_problems(self, world_size: int | None) -> tuple[list[Problem], int | None]:
        """Problems with the degrees for `world_size` (when known), and the dp degree if concrete."""
        if world_size is None:
            return [], None
        degrees = (self.parallel.dp, self.tp, self.parallel.pp)
        if any(is_auto(d) for d in degrees):
            return [], None
        try:
            dp, _, _ = derive_degrees(self.parallel, self.tensor_parallel.autotp_size, world_size=world_size)
        except ConfigError as e:
            return e.problems, None
        return [], dp

    def _tp_problems(self) -> list[Problem]:
        autotp, tp = self.tensor_parallel.autotp_size, self.parallel.tp
        if autotp is None or tp is None or autotp == tp or is_auto(autotp) or is_auto(tp):
            return []
        return [Problem("tensor_parallel.autotp_size",
                        f"autotp_size ({autotp}) disagrees with parallel.tp ({tp})",
                        given=autotp, suggestion="give the tensor-parallel degree in one place only")]

    @property
    def tp(self):
        """The tensor-parallel degree from either spelling; None when neither is given."""
        return self.parallel.tp if self.parallel.tp is not None else self.tensor_parallel.autotp_size

    @property
    def precision(self) -> str:
        """"fp16", "bf16", "fp32", or "auto" when either block says auto."""
        if self.fp16.enabled is True:
            return "fp16"
        if self.bf16.enabled is True:
            return "bf16"
        if is_auto(self.fp16.enabled) or is_auto(self.bf16.enabled):
            return "auto"
        return "fp32"
