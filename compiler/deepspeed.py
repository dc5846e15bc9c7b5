"""A Plan as a DeepSpeed config, so the same plan can be run by DeepSpeed.

Keys and spellings are DeepSpeed's (docs: deepspeed.ai/docs/config-json). What DeepSpeed
sets in code rather than in its config is left out and said so in the report: pipeline
stages (`PipelineModule(num_stages=pp)`) and activation checkpointing (the training script
calls `deepspeed.checkpointing.checkpoint`). The result validates with zeroplan's own
`load_config`, and compiling it again gives the same batch, ZeRO, offload and precision
sections (a test checks both).
"""

from __future__ import annotations

from typing import Any

from zeroplan.schemas import Plan
from zeroplan.schemas.optim import OPTIMIZER_PARAMS
from zeroplan.schemas.plan import OffloadTarget


def _optimizer(plan: Plan) -> dict[str, Any]:
    """The plan's optimizer with the parameters its type takes (schemas.optim.OPTIMIZER_PARAMS)."""
    o = plan.optimizer
    params = {k: getattr(o, k) for k in OPTIMIZER_PARAMS[o.type] if k in type(o).model_fields}
    if "betas" in params:
        params["betas"] = list(o.betas)
    if o.type == "Adam":
        params["adam_w_mode"] = o.decoupled_weight_decay
    return {"type": o.type, "params": params}


def _offload(target: OffloadTarget, *, max_in_cpu: int | None = None) -> dict[str, Any]:
    """DeepSpeed's `offload_param` / `offload_optimizer` section. Its config models forbid
    unknown keys, and only `offload_param` has `buffer_size` and `max_in_cpu` (DeepSpeed
    0.19, runtime/zero/offload_config.py): zeroplan's `offload_optimizer.buffer_size` (the
    size of its NVMe swap buffers) has no DeepSpeed counterpart and is left out."""
    out: dict[str, Any] = {"device": target.device, "pin_memory": target.pin_memory,
                           "buffer_count": target.buffer_count}
    if target.nvme_path:
        out["nvme_path"] = target.nvme_path
    if max_in_cpu is not None:  # offload_param
        out |= {"buffer_size": target.buffer_size, "max_in_cpu": max_in_cpu}
    elif target.ratio < 1:
        out["ratio"] = target.ratio
    return out


def _zero(plan: Plan) -> dict[str, Any]:
    z = plan.zero
    out: dict[str, Any] = {
        "stage": z.stage, "overlap_comm": z.overlap_comm, "contiguous_gradients": plan.deepspeed.contiguous_gradients,
        "reduce_scatter": z.reduce_scatter, "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size, "sub_group_size": z.sub_group_size,
    }
    if plan.offload.optimizer.device != "none":
        out["offload_optimizer"] = _offload(plan.offload.optimizer)
    if z.stage == 3:
        out |= {"stage3_prefetch_bucket_size": z.prefetch_bucket_size,
                "stage3_param_persistence_threshold": z.param_persistence_threshold,
                "stage3_model_persistence_threshold": z.model_persistence_threshold,
                "stage3_max_live_parameters": z.max_live_parameters,
                "stage3_max_reuse_distance": z.max_reuse_distance,
                "stage3_gather_16bit_weights_on_model_save": plan.deepspeed.stage3_gather_16bit_weights_on_model_save}
        if plan.offload.param.device != "none":
            out["offload_param"] = _offload(plan.offload.param, max_in_cpu=plan.deepspeed.offload_param_max_in_cpu)
    return out


def _precision(plan: Plan) -> dict[str, Any]:
    dtype, ls = plan.precision.param_dtype, plan.precision.loss_scaling
    fp16: dict[str, Any] = {"enabled": dtype == "fp16"}
    if dtype == "fp16":
        fp16 |= {"loss_scale": 0 if ls.dynamic else ls.static_scale, "initial_scale_power": ls.initial_scale_power,
                 "loss_scale_window": ls.window, "hysteresis": ls.hysteresis,
                 "consecutive_hysteresis": ls.consecutive_hysteresis, "min_loss_scale": ls.min_scale}
    out = {"fp16": fp16, "bf16": {"enabled": dtype == "bf16"}}
    if plan.precision.reduce_dtype != dtype:
        out["communication_data_type"] = plan.precision.reduce_dtype
    return out


def ds_config(plan: Plan) -> dict[str, Any]:
    """The DeepSpeed config equivalent to `plan` (JSON-ready)."""
    b, o, ac = plan.batch, plan.optimizer, plan.activation_checkpointing
    out: dict[str, Any] = {
        "train_batch_size": b.global_batch_size,
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": b.gradient_accumulation_steps,
        "optimizer": _optimizer(plan),
        **_precision(plan),
        "gradient_clipping": o.gradient_clipping,
        "prescale_gradients": o.prescale_gradients,
        "gradient_predivide_factor": o.gradient_predivide_factor,
        "zero_optimization": _zero(plan),
        "steps_per_print": plan.logging.steps_per_print,
        "wall_clock_breakdown": plan.logging.wall_clock_breakdown,
    }
    if plan.scheduler is not None:
        params = {k: v for k, v in plan.scheduler.params.items() if v is not None}
        out["scheduler"] = {"type": plan.scheduler.type, "params": params}
    if plan.parallel.tp > 1:
        out["tensor_parallel"] = {"autotp_size": plan.parallel.tp}
    if ac.enabled:
        out["activation_checkpointing"] = {"partition_activations": ac.partition_activations,
                                           "cpu_checkpointing": ac.cpu_checkpointing}
        if plan.deepspeed.number_checkpoints is not None:
            out["activation_checkpointing"]["number_checkpoints"] = plan.deepspeed.number_checkpoints
    if plan.logging.comms_logger:
        out["comms_logger"] = {"enabled": True}
    m = plan.monitors
    for key, target in (("tensorboard", m.tensorboard), ("csv_monitor", m.csv)):
        if target is not None:
            out[key] = {"enabled": True, "output_path": target.output_path, "job_name": target.job_name}
    if m.wandb is not None:
        out["wandb"] = {"enabled": True, **m.wandb.model_dump(exclude_none=True)}
    if m.flops_profiler is not None:
        out["flops_profiler"] = {"enabled": True, **m.flops_profiler.model_dump(exclude={"peak_flops", "peak_source"})}
    return out
