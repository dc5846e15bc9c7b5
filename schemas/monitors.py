"""Monitoring and profiling blocks: tensorboard, csv_monitor, wandb, comms_logger, flops_profiler.

Key names and defaults follow DeepSpeed's monitor and profiler configs.
"""

from .types import AutoFlag, Flag, Positive, Size, StrictModel, choice, count, real


class TensorboardConfig(StrictModel):
    enabled: Flag = False
    """Write TensorBoard event files (needs the tensorboard package)."""
    output_path: str = ""
    """Directory for event files; "" means the working directory."""
    job_name: str = "DeepSpeedJobName"
    """Sub-directory of output_path for this run's event files."""


class CsvMonitorConfig(StrictModel):
    enabled: Flag = False
    """Write the training metrics as CSV files."""
    output_path: str = ""
    """Directory for CSV files; "" means the working directory."""
    job_name: str = "DeepSpeedJobName"
    """Sub-directory of output_path for this run's CSV files."""


class WandbConfig(StrictModel):
    enabled: Flag = False
    """Log the training metrics to Weights & Biases (needs the wandb package)."""
    project: str = "deepspeed"
    """W&B project name."""
    group: str | None = None
    """W&B run group; None leaves the run ungrouped."""
    team: str | None = None
    """W&B entity (team or user) that owns the project; None uses the logged-in user's default."""


class CometConfig(StrictModel):
    enabled: Flag = False
    """Log the training metrics to Comet; zeroplan does not, and says so."""
    project: str | None = None
    """Comet project name; None uses Comet's default."""
    workspace: str | None = None
    """Comet workspace; None uses Comet's default."""
    experiment_name: str | None = None
    """Display name of the Comet experiment."""
    experiment_key: str | None = None
    """Key of an existing experiment to continue; None starts a new one."""
    api_key: str | None = None
    """Comet API key; None leaves it to Comet's own config or environment."""
    mode: str | None = None
    """Comet's start mode (`get`, `create` or `get_or_create`); None uses Comet's default."""
    online: Flag | None = None
    """Log online (true) or to an offline archive (false); None uses Comet's default."""
    samples_log_interval: Positive = 100
    """Log metrics every N training samples."""


class CommsLoggerConfig(StrictModel):
    enabled: Flag = False
    """Record each collective's size and time, summarised by rank 0."""
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
    """Profile the FLOPs of one optimizer step (profile_step) and report them with MFU."""
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
    """Turn on DeepCompile's compiler passes."""
    autoep_non_moe: Flag = False
    """DeepCompile: apply expert parallelism passes to non-MoE layers."""
    free_activation: Flag = False
    """DeepCompile: free activations early, once their last use has run."""
    free_activation_threshold: Size = 10 * 1024 * 1024
    """DeepCompile: smallest activation to free early, in bytes."""
    offload_activation: Flag = False
    """DeepCompile: move activations to host memory between forward and backward."""
    offload_activation_pin_memory: Flag = True
    """DeepCompile: pin the host buffers that hold offloaded activations."""
    offload_opt_states: Flag = False
    """DeepCompile: offload optimizer states to host memory."""
    double_buffer: Flag = True
    """DeepCompile: double-buffer offload transfers to overlap them with compute."""
    symmetric_memory: Flag = False
    """DeepCompile: use symmetric memory for collectives."""
    debug_log: Flag = False
    """DeepCompile: log its passes' decisions."""
    offload_parameters: Flag = False
    """DeepCompile: offload parameters to host memory."""
    sync_before_reduce: Flag = False
    """DeepCompile: synchronise the device before each gradient reduction (debugging)."""
    sync_after_reduce: Flag = False
    """DeepCompile: synchronise the device after each gradient reduction (debugging)."""
    sync_before_allgather: Flag = False
    """DeepCompile: synchronise the device before each parameter all-gather (debugging)."""
    sync_after_allgather: Flag = False
    """DeepCompile: synchronise the device after each parameter all-gather (debugging)."""
    keep_int_input_tensors: Flag = True
    """DeepCompile: keep integer input tensors alive for backward."""
    keep_all_input_tensors: Flag = False
    """DeepCompile: keep every input tensor alive for backward."""
    passes: list[choice("z1", "z3", "autosp", "autotp")] | None = None
    """DeepCompile passes to run (z1, z3, autosp, autotp); None runs DeepCompile's default set."""


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


