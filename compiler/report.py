"""What report.md shows, computed here so the template only lays it out."""

from __future__ import annotations

import json
from typing import Any

from zeroplan.schemas import ClusterSpec, ModelSpec, Plan, TrainConfig

from .placement import crossing_line, node_lines


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", json.dumps(value)))
    return rows


def _tag(key: str, derived: tuple[str, ...]) -> str:
    return "derived" if key in derived else "given"


def _degrees_row(plan: Plan, config: TrainConfig) -> tuple[str, str, str]:
    p = plan.parallel
    given = {"dp": config.parallel.dp is not None, "tp": config.tp is not None, "pp": config.parallel.pp is not None}
    how = ", ".join(f"{d} {'given' if given[d] else ('derived' if d == 'dp' else 'default 1')}"
                    for d in ("dp", "tp", "pp"))
    sp = ", sequence parallel" if p.sequence_parallel and p.tp > 1 else ""
    return ("degrees", f"dp {p.dp} x tp {p.tp} x pp {p.pp}{sp}",
            f"{how}; dp = world_size / (tp x pp)")


def _layout_row(plan: Plan, config: TrainConfig) -> tuple[str, str, str]:
    order = plan.layout.order
    how = "parallel.layout" if config.parallel.layout is not None else "default (Megatron-LM's: tp within a node)"
    return ("rank layout", f"{', '.join(order)} (slowest first, {order[-1]} fastest); {crossing_line(plan.layout)}",
            f"{how}; " + "; ".join(node_lines(world=plan.world, parallel=plan.parallel, layout=plan.layout)))


def _optimizer_row(plan: Plan, config: TrainConfig) -> tuple[str, str, str]:
    o = plan.optimizer
    value = f"{o.type} lr {o.lr:g}, weight decay {o.weight_decay:g}"
    value += f", betas {tuple(o.betas)}, eps {o.eps:g}" if o.type != "SGD" else f", momentum {o.momentum:g}"
    how = "config's optimizer block, defaults for the rest" if config.optimizer else "no optimizer block: AdamW lr 1e-3"
    return ("optimizer", value, how)


def _kernel_reason(plan: Plan) -> str:
    k = plan.kernels.optimizer
    return {"cpu_adam": "the optimizer step is offloaded to the host",
            "cuda_fused": "cuda device, optimizer on the device",
            "torch_fused": "cpu device, no offload",
            "torch_foreach": "SGD"}[k]


def derived_rows(plan: Plan, config: TrainConfig) -> list[tuple[str, str, str]]:
    b, w, z = plan.batch, plan.world, plan.zero
    rows = [
        ("world size", str(w.world_size), f"nnodes({w.nnodes}) x nproc_per_node({w.nproc_per_node}); "
                                          f"{w.backend} on {w.device}"),
        _degrees_row(plan, config),
        _layout_row(plan, config),
        ("batch", f"global {b.global_batch_size} = micro {b.micro_batch_size} x accumulation "
                  f"{b.gradient_accumulation_steps} x dp {plan.parallel.dp}",
         f"train_batch_size {_tag('train_batch_size', b.derived)}, "
         f"micro {_tag('train_micro_batch_size_per_gpu', b.derived)}, "
         f"accumulation {_tag('gradient_accumulation_steps', b.derived)}"),
        ("precision", f"{plan.precision.param_dtype} params, {plan.precision.reduce_dtype} reductions, fp32 masters",
         "fp16/bf16 blocks" + ("; dynamic loss scaling" if plan.precision.loss_scaling.enabled else "")),
        ("ZeRO", f"stage {z.stage}, reduce bucket {z.reduce_bucket_size:,} / all-gather bucket "
                 f"{z.allgather_bucket_size:,} elements, overlap_comm {str(z.overlap_comm).lower()}",
         "; ".join(f"{k.rsplit('.', 1)[1]}: {v}" for k, v in plan.provenance.derived.items())
         or "zero_optimization block (DeepSpeed defaults for keys left out)"),
        ("offload", f"optimizer: {plan.offload.optimizer.device}, parameters: {plan.offload.param.device}",
         "zero_optimization.offload_optimizer / offload_param"),
        _optimizer_row(plan, config),
        ("scheduler", plan.scheduler.type if plan.scheduler else "constant learning rate",
         "DeepSpeed's defaults for parameters left out" if plan.scheduler else "no scheduler block"),
        ("optimizer kernel", plan.kernels.optimizer, _kernel_reason(plan)),
        ("activation checkpointing", "on" if plan.activation_checkpointing.enabled else "off",
         "activation_checkpointing.enabled"),
    ]
    return rows


def report_context(plan: Plan, *, config: TrainConfig, model: ModelSpec, cluster: ClusterSpec,
                   source: str) -> dict[str, Any]:
    est = plan.estimates
    host = est.host_memory_per_rank
    categories = [*est.memory_per_rank, *(k for k in host if k not in est.memory_per_rank)]
    memory_rows = [(k, est.memory_per_rank.get(k, 0), host.get(k, 0)) for k in categories]
    device_total = sum(est.memory_per_rank.values())
    limit = est.memory_limit_per_rank or cluster.memory_per_rank()
    seconds = est.predicted_step_time_s or float("inf")
    given = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return {
        "plan": plan, "model": model, "cluster": cluster, "source": source,
        "given": _flatten(given), "derived": derived_rows(plan, config),
        "memory_rows": memory_rows, "device_total": device_total, "host_total": sum(host.values()),
        "limit": limit, "fits": not any(w.startswith(("does not fit", "host memory does not")) for w in est.warnings),
        "samples_per_s": plan.batch.global_batch_size / seconds,
        "tokens_per_s": plan.batch.global_batch_size * model.seq_len / seconds,
    }
