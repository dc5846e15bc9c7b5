"""A concrete `TrainConfig` (no "auto" left) -> the Plan's sections, one small function each.

Defaults the config leaves open are filled here and nowhere else: the optimizer (AdamW,
lr 1e-3, when the config has none; each type's DeepSpeed defaults, `schemas.optim.OPTIMIZER_DEFAULTS`),
DeepSpeed's scheduler defaults (`schemas.optim.SCHEDULER_DEFAULTS`), the optimizer kernel for
the cluster's device, and the swap tile of `sub_group_size: 0`.
"""

from __future__ import annotations

import importlib.util

from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Problem, TrainConfig
from zeroplan.schemas.optim import OPTIMIZER_DEFAULTS, OPTIMIZER_PARAMS
from zeroplan.schemas.plan import (
    ActivationCheckpointingPlan,
    DeepSpeedPassThrough,
    FlopsProfilerPlan,
    KernelsPlan,
    LoggingPlan,
    LossScalePlan,
    MonitorOutput,
    MonitorsPlan,
    OffloadPlan,
    OffloadTarget,
    OptimizerPlan,
    PrecisionPlan,
    SchedulerPlan,
    WandbPlan,
    WorldPlan,
    ZeroPlan,
)

from .flops import peak_flops
from .shapes import stage_shapes
from .shards import chunk

DEFAULT_LR = 1e-3
"""torch.optim.AdamW's and DeepSpeed's Adam default learning rate."""


def world_plan(config: TrainConfig, cluster: ClusterSpec) -> WorldPlan:
    return WorldPlan(nnodes=cluster.nnodes, nproc_per_node=cluster.nproc_per_node, world_size=cluster.world_size,
                     device=cluster.device, backend="nccl" if cluster.device == "cuda" else "gloo",
                     collective_timeout_s=config.failures.collective_timeout_s)


def largest_partition(model: ModelSpec, *, dp: int, tp: int, pp: int, method: str) -> int:
    """Elements of the largest parameter's per-rank partition: what `sub_group_size: 0` makes
    the swap tile, as DeepSpeed's ZeRO-3 then steps one parameter per sub-group."""
    biggest = max(max(shape.tensors) for shape in stage_shapes(model, tp=tp, pp=pp, method=method))
    return chunk(biggest, dp)


def zero_plan(config: TrainConfig, *, largest: int) -> ZeroPlan:
    """`largest`: see `largest_partition`, used when sub_group_size is 0."""
    z = config.zero_optimization
    return ZeroPlan(
        stage=z.stage, reduce_bucket_size=z.reduce_bucket_size, allgather_bucket_size=z.allgather_bucket_size,
        overlap_comm=z.overlap_comm, reduce_scatter=z.reduce_scatter,
        prefetch_bucket_size=z.stage3_prefetch_bucket_size,
        param_persistence_threshold=z.stage3_param_persistence_threshold,
        model_persistence_threshold=z.stage3_model_persistence_threshold,
        max_live_parameters=z.stage3_max_live_parameters, max_reuse_distance=z.stage3_max_reuse_distance,
        sub_group_size=z.sub_group_size or largest)


def offload_plan(config: TrainConfig) -> OffloadPlan:
    opt, par = config.zero_optimization.offload_optimizer, config.zero_optimization.offload_param
    return OffloadPlan(
        optimizer=OffloadTarget(device=opt.device, nvme_path=opt.nvme_path, pin_memory=opt.pin_memory,
                                buffer_count=opt.buffer_count, buffer_size=opt.buffer_size, ratio=opt.ratio),
        param=OffloadTarget(device=par.device, nvme_path=par.nvme_path, pin_memory=par.pin_memory,
                            buffer_count=par.buffer_count, buffer_size=par.buffer_size))


def precision_plan(config: TrainConfig) -> PrecisionPlan:
    dtype = config.precision
    fp16 = config.fp16
    scaling = LossScalePlan()
    if dtype == "fp16":
        scaling = LossScalePlan(enabled=True, dynamic=fp16.dynamic, static_scale=fp16.loss_scale or 1.0,
                                initial_scale_power=fp16.initial_scale_power, window=max(fp16.loss_scale_window, 1),
                                hysteresis=fp16.hysteresis, consecutive_hysteresis=fp16.consecutive_hysteresis,
                                min_scale=fp16.min_loss_scale)
    return PrecisionPlan(param_dtype=dtype, reduce_dtype=config.communication_data_type or dtype,
                         loss_scaling=scaling, nonfinite=config.failures.nonfinite)


def optimizer_plan(config: TrainConfig) -> OptimizerPlan:
    common = dict(gradient_clipping=config.gradient_clipping, prescale_gradients=config.prescale_gradients,
                  gradient_predivide_factor=config.gradient_predivide_factor,
                  no_decay=config.param_groups.no_decay, missing_grads=config.param_groups.missing_grads)
    if config.optimizer is None:
        return OptimizerPlan(type="AdamW", lr=DEFAULT_LR, **common)
    kind, p = config.optimizer.type, config.optimizer.params
    given = {k: getattr(p, k) for k in OPTIMIZER_PARAMS[kind]
             if k in OptimizerPlan.model_fields and getattr(p, k) is not None}
    values = {**OPTIMIZER_DEFAULTS[kind], **given}
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    # DeepSpeed's Adam decouples weight decay unless adam_w_mode is false (deepspeed/ops/adam);
    # Lion's decay is decoupled; SGD and Adagrad add it to the gradient, Lamb to the update.
    decoupled = kind in ("AdamW", "Lion") or (kind == "Adam" and p.adam_w_mode is not False)
    return OptimizerPlan(type=kind, decoupled_weight_decay=decoupled, **values, **common)


def optimizer_problems(config: TrainConfig, *, tp: int) -> list[Problem]:
    """Lamb's trust ratio needs each tensor's whole norm: zeroplan sums a tensor's squared norm
    over the dp shards, but not over tp ranks, and not across NVMe tiles (stepped one at a time);
    and it steps the whole shard in one call, so with one weight decay (no `no_decay` groups)."""
    if config.optimizer is None or config.optimizer.type != "Lamb":
        return []
    problems = []
    if config.param_groups.no_decay:
        problems.append(Problem("param_groups.no_decay", "Lamb steps the whole shard with one weight decay (its "
                                "trust ratio is taken over each tensor's update, decay included)",
                                given=list(config.param_groups.no_decay),
                                suggestion="leave param_groups.no_decay out with Lamb, or use AdamW"))
    if tp > 1:
        problems.append(Problem("optimizer.type", f"Lamb with tensor parallelism (tp {tp}) is not supported: its "
                                "per-tensor trust ratio would see only each tp rank's slice", given="Lamb",
                                suggestion="use tp 1 with Lamb, or another optimizer"))
    if config.zero_optimization.offload_optimizer.device == "nvme":
        problems.append(Problem("zero_optimization.offload_optimizer.device", "Lamb cannot step NVMe tiles: its "
                                "per-tensor trust ratio needs the whole shard at once", given="nvme",
                                suggestion="offload Lamb's state to 'cpu', or use another optimizer"))
    return problems


def scheduler_plan(config: TrainConfig) -> SchedulerPlan | None:
    if config.scheduler is None:
        return None
    return SchedulerPlan(type=config.scheduler.type, params=config.scheduler.resolved_params())


def kernels_plan(config: TrainConfig, cluster: ClusterSpec) -> KernelsPlan:
    """The optimizer kernel: where the step runs decides it.

    An offloaded step runs on the host: cpu_adam (ZeRO-Offload's SIMD Adam). Otherwise
    cuda_fused on cuda and torch_fused on cpu, or torch_foreach on cpu without bias correction,
    which torch's fused Adam always applies. SGD, Lamb, Lion and Adagrad have no fused kernel of
    ours: torch_foreach.
    """
    kind = config.optimizer.type if config.optimizer is not None else "AdamW"
    if kind not in ("Adam", "AdamW"):
        return KernelsPlan(optimizer="torch_foreach")
    if config.zero_optimization.offload_optimizer.device in ("cpu", "nvme"):
        return KernelsPlan(optimizer="cpu_adam")
    if cluster.device == "cuda":
        return KernelsPlan(optimizer="cuda_fused")
    corrected = config.optimizer is None or config.optimizer.params.bias_correction is not False
    return KernelsPlan(optimizer="torch_fused" if corrected else "torch_foreach")


def checkpointing_plan(config: TrainConfig) -> ActivationCheckpointingPlan:
    ac = config.activation_checkpointing
    return ActivationCheckpointingPlan(enabled=ac.enabled, cpu_checkpointing=ac.cpu_checkpointing,
                                       partition_activations=ac.partition_activations)


def deepspeed_plan(config: TrainConfig) -> DeepSpeedPassThrough:
    z = config.zero_optimization
    return DeepSpeedPassThrough(
        contiguous_gradients=z.contiguous_gradients,
        stage3_gather_16bit_weights_on_model_save=z.stage3_gather_16bit_weights_on_model_save,
        offload_param_max_in_cpu=z.offload_param.max_in_cpu,
        number_checkpoints=config.activation_checkpointing.number_checkpoints)


def monitors_plan(config: TrainConfig, cluster: ClusterSpec) -> MonitorsPlan:
    """The enabled monitor blocks; each must find its client (a missing one is an error here,
    at compile time, not at the first step)."""
    tb, csv, wandb = config.tensorboard, config.csv_monitor, config.wandb
    problems = [Problem(f"{key}.enabled", f"{key} needs the {package} package, which is not installed", given=True,
                        suggestion=f"pip install 'zeroplan[monitors]' (or {package}), or set {key}.enabled false")
                for key, package, block in (("tensorboard", "tensorboard", tb), ("wandb", "wandb", wandb))
                if block.enabled and importlib.util.find_spec(package) is None]
    if problems:
        raise ConfigError(problems)
    return MonitorsPlan(
        tensorboard=MonitorOutput(output_path=tb.output_path, job_name=tb.job_name) if tb.enabled else None,
        csv=MonitorOutput(output_path=csv.output_path, job_name=csv.job_name) if csv.enabled else None,
        wandb=WandbPlan(project=wandb.project, group=wandb.group, team=wandb.team) if wandb.enabled else None,
        flops_profiler=flops_profiler_plan(config, cluster))


def flops_profiler_plan(config: TrainConfig, cluster: ClusterSpec) -> FlopsProfilerPlan | None:
    """DeepSpeed's block with the cluster's matmul rate in the training dtype as MFU's peak, so
    the runtime, which reads only the plan, can report MFU."""
    fp = config.flops_profiler
    if not fp.enabled:
        return None
    return FlopsProfilerPlan(
        profile_step=fp.profile_step, module_depth=fp.module_depth, top_modules=fp.top_modules, detailed=fp.detailed,
        output_file=fp.output_file or None, recompute_fwd_factor=fp.recompute_fwd_factor,
        peak_flops=peak_flops(cluster, dtype=config.precision), peak_source=cluster.rates_source)


def logging_plan(config: TrainConfig) -> LoggingPlan:
    return LoggingPlan(steps_per_print=config.steps_per_print, wall_clock_breakdown=config.wall_clock_breakdown,
                       comms_logger=config.comms_logger.enabled)
