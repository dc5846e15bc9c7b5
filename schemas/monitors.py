"""Monitoring and profiling blocks: tensorboard, csv_monitor, wandb, comms_logger, flops_profiler.

Key names and defaults follow DeepSpeed's monitor and profiler configs.
"""

from .types import AutoFlag, Flag, Positive, Size, StrictModel, choice, count, real


class TensorboardConfig(StrictModel):
    enabled: Flag = False
    output_path: str = ""
    """Directory for event files; "" means the working directory."""
    job_name: str = "DeepSpeedJobName"


class CsvMonitorConfig(StrictModel):
    enabled: Flag = False
    output_path: str = ""
    """Directory for CSV files; "" means the working directory."""
    job_name: str = "DeepSpeedJobName"


class WandbConfig(StrictModel):
    enabled: Flag = False
    project: str = "deepspeed"
    group: str | None = None
    team: str | None = None


class CometConfig(StrictModel):
    enabled: Flag = False
    project: str | None = None
    workspace: str | None = None
    experiment_name: str | None = None
    experiment_key: str | None = None
    api_key: str | None = None
    mode: str | None = None
    online: Flag | None = None
    samples_log_interval: Positive = 100


class CommsLoggerConfig(StrictModel):
    enabled: Flag = False
    verbose: Flag = False
    """Log every collective as it runs."""
    prof_all: Flag = True
    """Profile every collective (else only those in prof_ops)."""
    debug: Flag = False
    """Name the calling function with each collective."""
    prof_ops: list[str] = []
    """Collectives to profile when prof_all is false."""


class FlopsProfilerConfig(StrictModel):
    """DeepSpeed's FLOPs profiler: one optimizer step's FLOPs counted on every rank, reported by
    rank 0 (runtime/flops.py)."""

    enabled: Flag = False
    recompute_fwd_factor: real(ge=0) = 0.0
    """DeepSpeed's estimate of the forwards recomputed per step (0.0 none, 1.0 full), for its
    backward = (2 + factor) x forward. zeroplan counts the recompute that really runs and prints
    DeepSpeed's estimate beside the count."""
    profile_step: Positive = 1
    """Optimizer step to profile (1-based, DeepSpeed's global step)."""
    module_depth: count(ge=-1) = -1
    """Depth of the module tree to report (the model is depth 0); -1 for all."""
    top_modules: Positive = 1
    """Module classes listed per depth, by FLOPs."""
    detailed: Flag = True
    """Print every module (to module_depth) with its FLOPs and parameters."""
    output_file: str | None = None
    """File for rank 0's report, written atomically; None or "" prints it."""


class ActivationCheckpointingConfig(StrictModel):
    enabled: AutoFlag = False
    """zeroplan's: recompute each transformer block in backward (DeepSpeed leaves this to the
    training script, so its configs omit the key); "auto" lets compile decide by memory."""
    partition_activations: Flag = False
    """Shard checkpointed activations across model-parallel ranks."""
    cpu_checkpointing: Flag = False
    """Move checkpointed activations to host memory."""
    contiguous_memory_optimization: Flag = False
    """Copy checkpoints into one contiguous buffer."""
    number_checkpoints: Positive | None = None
    """Checkpoints per model (for contiguous buffers); None lets the model decide."""
    synchronize_checkpoint_boundary: Flag = False
    """Synchronise the device at each checkpoint boundary (debugging)."""
    profile: Flag = False
    """Time the checkpointed forward and recompute."""


class CheckpointConfig(StrictModel):
    tag_validation: choice("Ignore", "Warn", "Fail") = "Warn"
    """Check that all ranks save under the same tag: Ignore, Warn or Fail."""
    load_universal: Flag = False
    """Load a DeepSpeed universal checkpoint."""
    use_node_local_storage: Flag = False
    """Each node writes its own checkpoint files to local disk."""
    parallel_write: dict = {}
    """DeepSpeed's pipeline-stage parallel write options; recorded as given."""


class CompileConfig(StrictModel):
    """DeepSpeed's `compile` block (DeepCompile, deepspeed/compile/config.py in 0.19): validated
    like DeepSpeed does, an unknown key is an error; zeroplan acts on none of it (one notice)."""

    deepcompile: Flag = False
    autoep_non_moe: Flag = False
    free_activation: Flag = False
    free_activation_threshold: Size = 10 * 1024 * 1024
    offload_activation: Flag = False
    offload_activation_pin_memory: Flag = True
    offload_opt_states: Flag = False
    double_buffer: Flag = True
    symmetric_memory: Flag = False
    debug_log: Flag = False
    offload_parameters: Flag = False
    sync_before_reduce: Flag = False
    sync_after_reduce: Flag = False
    sync_before_allgather: Flag = False
    sync_after_allgather: Flag = False
    keep_int_input_tensors: Flag = True
    keep_all_input_tensors: Flag = False
    passes: list[choice("z1", "z3", "autosp", "autotp")] | None = None


class AioConfig(StrictModel):
    """Asynchronous I/O settings for NVMe offload (DeepSpeed's `aio` block)."""

    block_size: Positive = 1_048_576
    """Bytes per I/O request."""
    queue_depth: Positive = 8
    """Requests in flight."""
    intra_op_parallelism: Positive = 1
    """I/O threads per operation (DeepSpeed's older name: thread_count)."""
    single_submit: Flag = False
    """Submit requests one at a time rather than in batches."""
    overlap_events: Flag = True
    """Overlap request submission and completion."""
    use_gds: Flag = False
    """GPUDirect Storage; not used by zeroplan."""


