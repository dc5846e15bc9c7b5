"""`zeroplan estimate`: per-rank memory for every ZeRO stage x offload option of one model.

Like DeepSpeed's `estimate_zero2_model_states_mem_needs_all_live` and its stage-3 sibling,
but complete: besides model states it counts activations, communication buffers and runtime
overhead, and says which options fit the cluster. Each row is a real compile of a concrete
config, so it uses exactly the memory model `zeroplan compile` uses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from zeroplan.schemas import ClusterSpec, ConfigWarning, ModelSpec, Plan, validate_config
from zeroplan.schemas.cluster import GiB

from .compile import compile

OPTIONS: tuple[tuple[int, str, str], ...] = (
    (0, "none", "none"),
    (1, "none", "none"), (1, "cpu", "none"), (1, "nvme", "none"),
    (2, "none", "none"), (2, "cpu", "none"), (2, "nvme", "none"),
    (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu"), (3, "nvme", "none"), (3, "nvme", "cpu"),
    (3, "nvme", "nvme"),
)
"""(stage, offload_optimizer.device, offload_param.device) combinations the schema allows."""


@dataclass(frozen=True)
class EstimateRow:
    stage: int
    offload_optimizer: str
    offload_param: str
    plan: Plan

    @property
    def device(self) -> dict[str, int]:
        return self.plan.estimates.memory_per_rank

    @property
    def model_states(self) -> int:
        d = self.device
        return d["parameters"] + d["gradients"] + d["optimizer_states"] + d["master_weights"]

    @property
    def total(self) -> int:
        return sum(self.device.values())

    @property
    def fits(self) -> bool:
        return not any("does not fit" in w for w in self.plan.estimates.warnings)


def _config(*, stage: int, optimizer: str, param: str, micro_batch: int, precision: str, checkpointing: bool,
            nvme_path: str, tp: int) -> dict:
    def offload(device: str) -> dict:
        return {"device": device, **({"nvme_path": nvme_path} if device == "nvme" else {})}
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
            "activation_checkpointing": {"enabled": checkpointing}, "parallel": {"tp": tp},
            "zero_optimization": {"stage": stage, "offload_optimizer": offload(optimizer),
                                  "offload_param": offload(param)}}


def estimate_rows(model: ModelSpec, cluster: ClusterSpec, *, micro_batch: int = 1, precision: str | None = None,
                  checkpointing: bool = False, tp: int = 1) -> list[EstimateRow]:
    """One compiled plan per stage x offload option (precision: bf16 on cuda, fp32 on cpu by default),
    with `tp`-way tensor parallelism (dp is what the cluster's ranks leave)."""
    precision = precision or ("bf16" if cluster.device == "cuda" else "fp32")
    nvme_path = cluster.nvme_path or "/local_nvme"
    rows = []
    for stage, opt, par in OPTIONS:
        data = _config(stage=stage, optimizer=opt, param=par, micro_batch=micro_batch, precision=precision,
                       checkpointing=checkpointing, nvme_path=nvme_path, tp=tp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            config = validate_config(data, source=f"stage {stage} option")
        rows.append(EstimateRow(stage, opt, par, compile(config, model, cluster)))
    return rows


_COLUMNS = ("stage", "offload opt", "offload param", "params", "grads", "optim", "master", "model states",
            "activations", "buffers", "overhead", "total/rank", "host/node", "nvme/node", "fits")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _cells(row: EstimateRow) -> list[str]:
    d, e = row.device, row.plan.estimates
    return [str(row.stage), row.offload_optimizer, row.offload_param, _gib(d["parameters"]), _gib(d["gradients"]),
            _gib(d["optimizer_states"]), _gib(d["master_weights"]), _gib(row.model_states), _gib(d["activations"]),
            _gib(d["comm_buffers"]), _gib(d["overhead"]), _gib(row.total), _gib(e.host_bytes_per_node),
            _gib(e.nvme_bytes_per_node), "yes" if row.fits else "NO"]


def render_table(rows: list[EstimateRow], *, model: ModelSpec, cluster: ClusterSpec) -> str:
    """Plain aligned text: a header naming the inputs, then one line per option (sizes in GiB)."""
    plan = rows[0].plan
    dp, tp = plan.parallel.dp, plan.parallel.tp
    header = [
        f"model {model.name}: {model.total_params:,} parameters; cluster {cluster.name}: "
        f"{cluster.nnodes} node(s) x {cluster.nproc_per_node} {cluster.device} rank(s), dp {dp}, tp {tp}, "
        f"{cluster.memory_per_rank() / GiB:.2f} GiB per rank ({cluster.rates_source})",
        f"micro-batch {plan.batch.micro_batch_size} x {model.seq_len} tokens, {plan.precision.param_dtype}, "
        f"Adam; activation checkpointing {'on' if plan.activation_checkpointing.enabled else 'off'}; "
        f"dropout {model.dropout:g}",
        "model states per parameter (ZeRO paper, mixed precision): stage 0: 16 B, 1: 4 + 12/dp, 2: 2 + 14/dp, "
        "3: 16/dp; sizes in GiB",
        "",
    ]
    table = [list(_COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]
    return "\n".join(header + lines)
