"""The Plan: what `compiler.compile` emits and the runtime reads. Data, not behaviour.

Every field is concrete (nothing "auto"), the model is frozen, and it round-trips through
JSON exactly. The runtime reads only the Plan, never the config, and never changes it;
builders take the slice they need (`plan.zero`, `plan.precision`, ...), keyword-only.

Bump `PLAN_VERSION` when a field changes meaning or is removed; readers refuse a plan of
another version with a message that says which versions they read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from .atomic import atomic_write_text
from .batch import BatchPlan
from .errors import ConfigError, Problem
from .layout import DEFAULT_ORDER, Dim, Topology, crossing_dims, node_ranks, order_problem
from .optim import OPTIMIZERS
from .types import FrozenModel

OPTIMIZER_KERNELS = ("cpu_adam", "cuda_fused", "torch_fused", "torch_foreach")
"""Every Adam kernel a plan can name (`kernels.optimizer`)."""

PLAN_VERSION = 2
"""2: the DeepSpeed values zeroplan does not act on moved into the `deepspeed` section."""

Device = Literal["none", "cpu", "nvme"]
Dtype = Literal["fp32", "bf16", "fp16"]


class WorldPlan(FrozenModel):
    nnodes: int = Field(ge=1)
    nproc_per_node: int = Field(ge=1)
    world_size: int = Field(ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    """Accelerator kind; cpu runs on gloo, cuda on NCCL, through the same code path."""
    backend: Literal["gloo", "nccl"] = "gloo"
    collective_timeout_s: float = Field(default=600.0, ge=1)
    """Seconds a collective waits for every rank before it raises (a stuck or dead rank then
    ends the job instead of hanging it; `failures.collective_timeout_s`)."""

    @model_validator(mode="after")
    def _product(self) -> "WorldPlan":
        if self.nnodes * self.nproc_per_node != self.world_size:
            raise ValueError(f"nnodes({self.nnodes}) * nproc_per_node({self.nproc_per_node}) "
                             f"!= world_size({self.world_size})")
        return self


class ParallelPlan(FrozenModel):
    """Degrees; which rank holds which coordinate is the plan's `layout`."""

    dp: int = Field(ge=1)
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    pipeline_schedule: Literal["1f1b", "gpipe", "interleaved"] = "1f1b"
    """The order a stage runs its forwards and backwards (runtime/parallel/pipeline_schedules.py);
    'interleaved' is compiled and estimated but refused by the runtime (parallel.pipeline.schedule)."""
    pipeline_virtual_stages: int = Field(default=1, ge=1)
    """Model chunks per stage: >= 2 with the interleaved schedule, 1 otherwise."""
    pipeline_micro_batches: int = Field(default=1, ge=1)
    """Micro-batches per step through the pipeline (the accumulation count when pp > 1)."""
    pipeline_partition_method: str = "parameters"
    """How layers are cut into pp stages: 'parameters', 'uniform' or 'type:<regex>' (parallel.pipeline)."""
    sequence_parallel: bool = False
    """Megatron-style sequence parallelism within the tp group (parallel.sequence_parallel): norms
    and the residual stream hold 1/tp of the sequence; no effect at tp 1."""


class LayoutPlan(FrozenModel):
    """Which global rank holds which (pp, dp, tp) coordinate and which ranks share a node
    (schemas/layout.py has the arithmetic). `nodes` and `crosses_nodes` follow from `order`,
    the world and the degrees; they are written out so a reader, and the launch script, see them."""

    order: tuple[Dim, Dim, Dim] = DEFAULT_ORDER
    """The parallel dimensions slowest-varying first; ranks are numbered row-major over them and
    the runtime builds its process groups in this order. ("pp", "dp", "tp") is Megatron's."""
    nodes: tuple[tuple[int, int], ...]
    """Per node, its first and last global rank (what each node's launcher starts)."""
    crosses_nodes: tuple[Dim, ...]
    """The dimensions with a group whose ranks are on more than one node: their collectives use
    the inter-node link."""

    @classmethod
    def derive(cls, *, world: "WorldPlan", parallel: "ParallelPlan",
               order: tuple[str, str, str] = DEFAULT_ORDER) -> "LayoutPlan":
        topology = Topology(dp=parallel.dp, tp=parallel.tp, pp=parallel.pp, order=order)
        return cls(order=topology.order, nodes=node_ranks(nnodes=world.nnodes, nproc_per_node=world.nproc_per_node),
                   crosses_nodes=crossing_dims(topology, nproc_per_node=world.nproc_per_node))

    @model_validator(mode="after")
    def _an_order(self) -> "LayoutPlan":
        problem = order_problem(self.order)
        if problem:
            raise ValueError(problem)
        return self


class ZeroPlan(FrozenModel):
    """ZeRO settings. Sizes count elements, as in DeepSpeed."""

    stage: Literal[0, 1, 2, 3]
    reduce_bucket_size: int = Field(ge=1)
    """Elements per gradient reduction bucket."""
    allgather_bucket_size: int = Field(ge=1)
    """Elements per all-gather of updated parameters (stages 1-2)."""
    overlap_comm: bool
    """Every gradient bucket may be in flight during backward, each with a buffer of its own;
    false: one bucket in flight, its collective overlapping the backward that fills the next,
    which reuses its buffer (runtime/zero/comm.py). Stage 0 reducing in fp32 has every bucket in
    flight either way: its buckets are the gradient buffer itself (compiler.shards.reduces_in_place)."""
    reduce_scatter: bool = True
    """Stages 1-2: reduce-scatter gradients (True) or all-reduce them, each rank keeping its slice."""
    prefetch_bucket_size: int = Field(ge=0)
    """Stage 3: elements fetched ahead of use."""
    param_persistence_threshold: int = Field(ge=0)
    """Stage 3: parameters with fewer elements stay whole on every rank."""
    model_persistence_threshold: int = Field(ge=0)
    """Stage 3: cap on the elements kept whole by the persistence threshold."""
    max_live_parameters: int = Field(ge=0)
    """Stage 3: elements gathered or in flight at once beyond which nothing is prefetched."""
    max_reuse_distance: int = Field(ge=0)
    """Stage 3: a module run again within this many gathered elements stays gathered."""
    sub_group_size: int = Field(ge=1)
    """Elements per optimizer-step tile (the NVMe swap unit)."""


class OffloadTarget(FrozenModel):
    device: Device = "none"
    nvme_path: str | None = None
    pin_memory: bool = False
    buffer_count: int = Field(default=4, ge=1)
    buffer_size: int = Field(default=100_000_000, ge=1)
    """Elements per swap buffer."""
    ratio: float = Field(default=1.0, ge=0, le=1)
    """Fraction offloaded (optimizer, stage 3 only)."""


class OffloadPlan(FrozenModel):
    optimizer: OffloadTarget = OffloadTarget()
    param: OffloadTarget = OffloadTarget()


class LossScalePlan(FrozenModel):
    """fp16 loss scaling with DeepSpeed's semantics; disabled for fp32 and bf16."""

    enabled: bool = False
    dynamic: bool = True
    static_scale: float = Field(default=1.0, gt=0)
    initial_scale_power: int = 16
    window: int = Field(default=1000, ge=1)
    hysteresis: int = Field(default=2, ge=1)
    consecutive_hysteresis: bool = False
    min_scale: float = Field(default=1.0, gt=0)


class PrecisionPlan(FrozenModel):
    param_dtype: Dtype = "fp32"
    """Dtype of the parameters and activations the model computes with."""
    reduce_dtype: Dtype = "fp32"
    """Dtype of gradient collectives."""
    master_dtype: Literal["fp32"] = "fp32"
    """Dtype of the optimizer's master weights and states."""
    loss_scaling: LossScalePlan = LossScalePlan()
    nonfinite: Literal["stop", "skip"] = "stop"
    """fp32/bf16: what an inf/nan loss or gradient norm does: "stop" ends the run naming the
    step, "skip" skips the step as fp16's loss scaler does (`failures.nonfinite`)."""


class OptimizerPlan(FrozenModel):
    type: Literal[OPTIMIZERS] = "AdamW"
    lr: float = Field(default=1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's, Lamb's and Lion's (beta1, beta2)."""
    eps: float = Field(default=1e-8, gt=0)
    """Adam's, Lamb's and Adagrad's epsilon."""
    weight_decay: float = Field(default=0.0, ge=0)
    decoupled_weight_decay: bool = True
    """AdamW semantics (True) or L2 added to the gradient (False; torch.optim.Adam). Lion's
    decay is always decoupled, SGD's, Adagrad's and Lamb's never (Lamb adds it to the update)."""
    bias_correction: bool = True
    """Adam and Lamb: divide the moments by 1 - beta^step; False steps with the raw moments."""
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    max_coeff: float = Field(default=10.0, gt=0)
    """Lamb: upper clamp of the per-tensor trust ratio ||w|| / ||update||."""
    min_coeff: float = Field(default=0.01, ge=0)
    """Lamb: lower clamp of the trust ratio."""
    eps_inside_sqrt: bool = False
    """Lamb: sqrt(v + eps) rather than sqrt(v) + eps."""
    no_decay: tuple[str, ...] = ()
    """Patterns of the parameters stepped with weight decay 0 (config `param_groups.no_decay`;
    runtime/param_groups.py matches them)."""
    missing_grads: Literal["skip", "zero"] = "skip"
    """A parameter without a gradient in a step (on every dp rank): left as it is with its state
    and step count, as torch.optim does ("skip"), or stepped with a zero gradient ("zero", DeepSpeed)."""
    gradient_clipping: float = Field(default=0.0, ge=0)
    """Global gradient-norm clip; 0 disables."""
    gradient_predivide_factor: float = Field(default=1.0, gt=0)
    prescale_gradients: bool = False


class SchedulerPlan(FrozenModel):
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle"]
    params: dict[str, float | int | str | bool | None]
    """Every parameter concrete, DeepSpeed's names (see schemas.optim.SCHEDULER_DEFAULTS)."""


class KernelsPlan(FrozenModel):
    optimizer: Literal[OPTIMIZER_KERNELS] = "torch_foreach"
    """The Adam kernel (runtime/kernels/select.py says where each runs and what replaces it)."""


class ActivationCheckpointingPlan(FrozenModel):
    enabled: bool = False
    cpu_checkpointing: bool = False
    partition_activations: bool = False


class MonitorOutput(FrozenModel):
    """Where one file-writing monitor writes: `output_path/job_name`, as DeepSpeed lays it out."""

    output_path: str
    """Directory the job's folder is made in; "" is the working directory."""
    job_name: str


class WandbPlan(FrozenModel):
    project: str
    group: str | None = None
    team: str | None = None
    """The W&B entity the run is logged under; None is the user's default."""


class FlopsProfilerPlan(FrozenModel):
    """DeepSpeed's flops_profiler (runtime/flops.py): every rank counts the FLOPs of one
    optimizer step with torch's FlopCounterMode; rank 0 reports them with the step's latency,
    achieved FLOP/s and MFU against `peak_flops`."""

    profile_step: int = Field(ge=1)
    """Optimizer step counted (1-based, DeepSpeed's global step)."""
    module_depth: int = Field(default=-1, ge=-1)
    """Depth of the module tree reported (the model is depth 0); -1 for all."""
    top_modules: int = Field(default=1, ge=1)
    """Module classes listed per depth, by FLOPs."""
    detailed: bool = True
    """List every module to `module_depth` with its FLOPs and parameters."""
    output_file: str | None = None
    """File rank 0 writes the report to (atomically); None prints it."""
    recompute_fwd_factor: float = Field(default=0.0, ge=0)
    """DeepSpeed's estimate of the forwards recomputed per step; the report prints DeepSpeed's
    (3 + factor) x forward beside the count of what ran."""
    peak_flops: float = Field(gt=0)
    """FLOP/s of a large matmul on one device in the training dtype (the cluster's
    `matmul_flops_fp32` or `matmul_flops_16bit`): MFU's denominator."""
    peak_source: Literal["nominal", "measured"]
    """Where `peak_flops` comes from: a preset's datasheet figure or `zeroplan probe`."""


class MonitorsPlan(FrozenModel):
    """Training monitors rank 0 writes after every optimizer step (runtime/monitor.py), with
    DeepSpeed's event names, and the FLOPs profiler every rank runs. None: that monitor is off."""

    tensorboard: MonitorOutput | None = None
    """TensorBoard event files (torch's SummaryWriter; needs the tensorboard package)."""
    csv: MonitorOutput | None = None
    """One CSV file per event, `step,<name>` rows (DeepSpeed's csv_monitor)."""
    wandb: WandbPlan | None = None
    """A Weights & Biases run (needs the wandb package; WANDB_MODE=offline keeps it local)."""
    flops_profiler: FlopsProfilerPlan | None = None
    """One step's FLOPs, latency and MFU (DeepSpeed's flops_profiler)."""


class DeepSpeedPassThrough(FrozenModel):
    """Config values zeroplan's runtime does not act on, kept only so the ds_config.json export
    says what the config said (DESIGN: every other plan field is read by the runtime). The
    loader gives each a notice when it would have changed something in DeepSpeed."""

    contiguous_gradients: bool = True
    """zeroplan always reduces gradients through contiguous buckets."""
    stage3_gather_16bit_weights_on_model_save: bool = False
    """zeroplan consolidates weights with engine.full_state_dict() at every stage."""
    offload_param_max_in_cpu: int = Field(default=1_000_000_000, ge=0)
    """With NVMe parameter offload zeroplan keeps every partition in its file."""
    number_checkpoints: int | None = None
    """Sizes DeepSpeed's contiguous checkpoint buffer; zeroplan recomputes every block."""


class LoggingPlan(FrozenModel):
    steps_per_print: int = Field(default=10, ge=1)
    wall_clock_breakdown: bool = False
    comms_logger: bool = False


class Estimates(FrozenModel):
    """The compiler's predictions, kept with the plan so a run can be compared with them."""

    memory_per_rank: dict[str, int] = {}
    """Device bytes per rank by category (parameters, gradients, optimizer_states, ...)."""
    host_bytes_per_node: int = 0
    nvme_bytes_per_node: int = 0
    host_memory_per_rank: dict[str, int] = {}
    """Host bytes per rank by category: offloaded state, checkpointed activations, swap buffers."""
    comm_bytes_per_step: dict[str, int] = {}
    """Bytes sent per rank per step, by collective and parallel dimension."""
    comm_messages_per_step: dict[str, int] = {}
    predicted_step_time_s: float = 0.0
    step_time_breakdown_s: dict[str, float] = {}
    memory_limit_per_rank: int = 0
    """Bytes one rank may use on the cluster compiled for (0: unknown)."""
    host_memory_per_node: int = 0
    """Host bytes of one node on the cluster compiled for (0: unknown)."""
    warnings: tuple[str, ...] = ()
    """What the compiler found questionable but not wrong (does not fit, slow layout, ...)."""


class Provenance(FrozenModel):
    config_hash: str = ""
    """sha256 of the canonical config JSON the plan was compiled from."""
    zeroplan_version: str = ""
    model: str = ""
    model_source: str = ""
    """Where the model's shape came from when the caller gave none (`initialize(model, config=...)`):
    read from its Hugging Face config or measured from its module tree; the estimates are then
    approximate. Empty when the shape was given (a preset, a JSON file, the model's own spec)."""
    cluster: str = ""
    resolved_auto: dict[str, str] = {}
    """Dotted config keys that were "auto", with how each was decided."""
    derived: dict[str, str] = {}
    """Dotted config keys the config left out whose value compile derived from the model and
    the cluster instead of taking DeepSpeed's default (compiler/buckets.py), with why."""
    study_name: str | None = None
    study_identity: str = ""
    """sha256 of what the tuning study measured (config, model, world, cluster, zeroplan version,
    search space, measurement: autotune/identity.py); empty when the plan was not tuned."""
    model_identity: dict[str, str] = {}
    """The model the plan was tuned for: kind (spec, builder, script), ref, name, shape (a digest),
    params, and for a script its content digest and args. `zeroplan train` refuses another model;
    empty when the plan was not tuned (nothing is checked)."""
    trial_number: int | None = None
    measured_samples_per_s: float | None = None


class Plan(FrozenModel):
    plan_version: Literal[2] = PLAN_VERSION
    world: WorldPlan
    parallel: ParallelPlan
    layout: LayoutPlan
    """Filled with Megatron's order when a plan is built without it (see `_derive_layout`)."""
    batch: BatchPlan
    zero: ZeroPlan
    offload: OffloadPlan = OffloadPlan()
    precision: PrecisionPlan = PrecisionPlan()
    optimizer: OptimizerPlan = OptimizerPlan()
    scheduler: SchedulerPlan | None = None
    kernels: KernelsPlan = KernelsPlan()
    activation_checkpointing: ActivationCheckpointingPlan = ActivationCheckpointingPlan()
    logging: LoggingPlan = LoggingPlan()
    monitors: MonitorsPlan = MonitorsPlan()
    deepspeed: DeepSpeedPassThrough = DeepSpeedPassThrough()
    estimates: Estimates = Estimates()
    provenance: Provenance = Provenance()

    @model_validator(mode="before")
    @classmethod
    def _derive_layout(cls, data):
        """A plan given without a layout (built by hand, or compiled before the section existed)
        gets the default order's, derived from its world and degrees, as the compiler writes it."""
        if isinstance(data, dict) and data.get("layout") is None and "world" in data and "parallel" in data:
            try:
                world, parallel = WorldPlan.model_validate(data["world"]), ParallelPlan.model_validate(data["parallel"])
                data = {**data, "layout": LayoutPlan.derive(world=world, parallel=parallel)}
            except (ValidationError, ValueError):
                pass  # the sections' own validation reports what is wrong
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        p, w, b = self.parallel, self.world, self.batch
        if p.dp * p.tp * p.pp != w.world_size:
            raise ValueError(f"dp({p.dp}) * tp({p.tp}) * pp({p.pp}) != world_size({w.world_size})")
        derived = LayoutPlan.derive(world=w, parallel=p, order=self.layout.order)
        if self.layout != derived:
            raise ValueError(f"layout {self.layout.model_dump(exclude={'order'})} does not follow from nnodes({w.nnodes}), "
                             f"nproc_per_node({w.nproc_per_node}) and order {list(self.layout.order)}: expected "
                             f"{derived.model_dump(exclude={'order'})}; recompile the plan")
        if b.micro_batch_size * b.gradient_accumulation_steps * p.dp != b.global_batch_size:
            raise ValueError(f"batch {b.global_batch_size} != micro {b.micro_batch_size} x accumulation "
                             f"{b.gradient_accumulation_steps} x dp {p.dp}")
        if p.pp > 1 and p.pipeline_micro_batches != b.gradient_accumulation_steps:
            raise ValueError(f"parallel.pipeline_micro_batches({p.pipeline_micro_batches}) != "
                             f"batch.gradient_accumulation_steps({b.gradient_accumulation_steps}): a pipeline step "
                             "runs every accumulated micro-batch through the stages")
        if (p.pipeline_schedule == "interleaved") != (p.pipeline_virtual_stages > 1):
            raise ValueError(f"parallel.pipeline_virtual_stages({p.pipeline_virtual_stages}) with schedule "
                             f"{p.pipeline_schedule!r}: model chunks >= 2 go with the interleaved schedule only")
        if p.pipeline_schedule == "interleaved" and p.pipeline_micro_batches % p.pp:
            raise ValueError(f"parallel.pipeline_micro_batches({p.pipeline_micro_batches}) is not a multiple of "
                             f"pp({p.pp}), as the interleaved schedule needs")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file, fsync, rename): never a half-written plan."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file, or ConfigError naming the file and what is wrong."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(Problem("", f"cannot read plan: {e.strerror}"), source=str(path)) from e
        except UnicodeDecodeError as e:
            raise ConfigError(Problem("", f"not a plan: byte {e.start} is not UTF-8 text",
                                      suggestion="pass the plan.json `zeroplan compile` wrote"), source=str(path)) from e
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            problems = [Problem(".".join(str(p) for p in err["loc"]), err["msg"]) for err in e.errors()]
            if any(p.path == "plan_version" for p in problems):
                problems = [Problem("plan_version", f"this zeroplan reads plan version {PLAN_VERSION}",
                                    suggestion="recompile the plan with `zeroplan compile`")]
            raise ConfigError(problems, source=str(path)) from e
