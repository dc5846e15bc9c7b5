"""Per-rank memory of a Plan, by category: `estimate_memory(plan, model)` is the one entry point.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", section 3.1 and figure 1): mixed-precision Adam
keeps 2 bytes of 16-bit parameters, 2 of 16-bit gradients and K = 12 of optimizer state per
parameter (a 4-byte fp32 master copy, 4-byte momentum, 4-byte variance). Here the master copy
is its own category (`master_weights`), so `optimizer_states` is 8 bytes for Adam. With N dp
ranks: stage 0 keeps 16 bytes/param; stage 1 shards optimizer state and masters (4 + 12/N);
stage 2 also gradients (2 + 14/N); stage 3 also parameters (16/N). In fp32 the parameters are
the masters: 4 + 4 + 8, no separate copy.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4 and equation 2); see `layer_activation_bytes`. Offloaded state
(ZeRO-Offload, Ren et al. 2021; ZeRO-Infinity, Rajbhandari et al. 2021) moves from the device
categories to host or NVMe.

Measured corrections are applied through a `Calibration` (calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zeroplan.schemas import ModelSpec, Plan

from .calibration import DEVICE_CATEGORIES, HOST_CATEGORIES, Calibration
from .shapes import StageShape, persistent_elements, stage_shapes

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
MASTER_BYTES = 4
"""fp32 master weights (PrecisionPlan.master_dtype is always fp32)."""
RUNTIME_OVERHEAD = {"cuda": 1 << 30, "cpu": 512 << 20}
"""Nominal bytes a rank holds besides tensors: on cuda the CUDA context, cuBLAS workspace and
NCCL buffers (typically 0.5-1.5 GiB); on cpu the interpreter and torch's libraries (RSS of a
process that imported torch, ~0.4-0.5 GiB). Calibrate the `overhead` category from measurements."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank by category; host and NVMe figures are per rank too (x ranks per node)."""

    device: dict[str, int]
    host: dict[str, int]
    nvme: int
    nproc_per_node: int
    notes: tuple[str, ...] = field(default=())

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_per_node(self) -> int:
        return sum(self.host.values()) * self.nproc_per_node

    @property
    def nvme_per_node(self) -> int:
        return self.nvme * self.nproc_per_node


def optimizer_state_bytes(*, optimizer: str, momentum: float) -> int:
    """Bytes of optimizer state per parameter, masters excluded: Adam's two fp32 moments; SGD's momentum."""
    if optimizer in ("Adam", "AdamW"):
        return 8
    return 4 if momentum > 0 else 0


def model_states(*, params: int, dp: int, stage: int, param_dtype: str, optimizer: str = "AdamW",
                 momentum: float = 0.0, persistent: int = 0) -> dict[str, int]:
    """Device bytes of parameters, gradients, optimizer states and masters on one dp rank.

    `params` are the rank's (tp/pp slice of the) parameters; `persistent` of them stay whole at
    stage 3 (below the persistence threshold). Shards round up, as DeepSpeed pads partitions.
    """
    e = BYTES[param_dtype]
    shard = -(-params // dp)
    sharded_params = persistent + -(-(params - persistent) // dp) if stage == 3 else params
    master = MASTER_BYTES if param_dtype != "fp32" else 0
    state = optimizer_state_bytes(optimizer=optimizer, momentum=momentum)
    opt_elems = shard if stage >= 1 else params
    return {
        "parameters": sharded_params * e,
        "gradients": (shard if stage >= 2 else params) * e,
        "optimizer_states": opt_elems * state,
        "master_weights": opt_elems * master,
    }


def layer_activation_bytes(*, seq: int, micro: int, hidden: int, heads: int, ffn: int, kv_hidden: int | None = None,
                           tp: int = 1, element_bytes: int = 2, dropout: bool = False, flash: bool = False,
                           gated_mlp: bool = False) -> int:
    """Activation bytes one transformer block keeps for backward (no recomputation), on one tp rank.

    Korthikanti et al. 2022, section 4.1, count per layer in 16-bit with dropout:
    attention 11sbh + 5as^2b, MLP 19sbh, two norms 4sbh: sbh(34 + 5as/h); with tensor
    parallelism (equation 2) sbh(10 + 24/t + 5as/(ht)). Those bytes are 2 per stored element
    plus 1 per dropout-mask element. Here the element size is a parameter (4 in fp32) and
    dropout is optional: without it no masks are kept and the dropped-out copy of the softmax
    is the softmax itself, leaving sbh(32 + 2as/h) in 16-bit. Replicated on every tp rank: both
    norm inputs, the QKV and MLP inputs, the masks; split by t: Q, K, V, the projection input,
    the MLP's hidden activations and the scores. `flash` keeps per-row log-sum-exp statistics
    (fp32) instead of the scores (Dao et al. 2022, FlashAttention). `gated_mlp` (SwiGLU) keeps
    the gate and up outputs, the gate's activation and their product: 4 * ffn per token.
    """
    e, sbh, sb = element_bytes, seq * micro * hidden, seq * micro
    kv = kv_hidden if kv_hidden is not None else hidden
    mask = 1 if dropout else 0
    replicated = 2 * e * sbh + e * sbh + e * sbh + 2 * mask * sbh
    attention = e * sbh + 2 * e * sb * kv + e * sbh  # Q, K, V, projection input
    mlp = (4 if gated_mlp else 2) * e * sb * ffn
    if flash:
        scores = 4 * heads * sb
    else:
        scores = heads * seq * seq * micro * (e + (mask + e if dropout else 0))
    return replicated + (attention + mlp + scores) // tp


def head_activation_bytes(*, seq: int, micro: int, hidden: int, vocab: int, tp: int, element_bytes: int) -> int:
    """Final norm input, LM head input, logits and the fp32 log-softmax the loss keeps
    (Korthikanti et al. 2022, section 4.3: the output layer's 4sbv/t)."""
    sb = seq * micro
    return 2 * element_bytes * sb * hidden + (element_bytes + 4) * sb * vocab // tp


def in_flight(plan: Plan, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once: 1F1B keeps pp - stage (at most m),
    GPipe all m (Narayanan et al. 2021, section 2.2); without pipelining one."""
    p = plan.parallel
    if p.pp == 1:
        return 1
    if p.pipeline_schedule == "gpipe":
        return p.pipeline_micro_batches
    return min(p.pp - stage, p.pipeline_micro_batches)


def stage_activations(plan: Plan, model: ModelSpec, shape: StageShape) -> tuple[int, int]:
    """(device, host) activation bytes of one stage's rank."""
    e, tp, ac = BYTES[plan.precision.param_dtype], plan.parallel.tp, plan.activation_checkpointing
    s, b = model.seq_len, plan.batch.micro_batch_size
    per_layer = layer_activation_bytes(
        seq=s, micro=b, hidden=model.hidden, heads=model.heads, ffn=model.ffn,
        kv_hidden=(model.kv_heads or model.heads) * model.head_dim, tp=tp, element_bytes=e,
        flash=model.attention == "flash", gated_mlp=model.architecture == "llama")
    head = head_activation_bytes(seq=s, micro=b, hidden=model.hidden, vocab=model.vocab, tp=tp,
                                 element_bytes=e) if shape.last else 0
    n = in_flight(plan, shape.index)
    if not ac.enabled:
        return shape.layers * per_layer * n + head, 0
    # Full recomputation (Korthikanti et al. 2022, section 4.2): keep each block's input
    # (2sbh in 16-bit, split by t when partitioned) and rebuild one block at a time in backward.
    checkpoint = e * s * b * model.hidden // (tp if ac.partition_activations else 1)
    stored = shape.layers * checkpoint * n
    if ac.cpu_checkpointing:
        return per_layer + head, stored
    return stored + per_layer + head, 0


def comm_buffers(plan: Plan, shape: StageShape, *, model: ModelSpec) -> int:
    """Bytes of communication buffers: gradient reduction buckets (doubled when overlap_comm
    double-buffers them), the all-gather bucket of stages 1-2, ZeRO-3's gathered parameters
    (the module in use plus the prefetch bucket, capped by stage3_max_live_parameters) and
    pipeline send/receive buffers. Bucket sizes count elements, as in DeepSpeed."""
    z, p = plan.zero, plan.parallel
    e_p, e_r = BYTES[plan.precision.param_dtype], BYTES[plan.precision.reduce_dtype]
    total = 0
    if p.dp > 1:
        total += min(z.reduce_bucket_size, shape.params) * e_r * (2 if z.overlap_comm else 1)
        if z.stage in (1, 2):
            total += min(z.allgather_bucket_size, shape.params) * e_p
        if z.stage == 3:
            unit = max(shape.units)
            live = unit + min(z.prefetch_bucket_size, shape.params - unit)
            total += min(live, max(unit, z.max_live_parameters)) * e_p
    if p.pp > 1:
        total += 2 * e_p * model.seq_len * plan.batch.micro_batch_size * model.hidden
    return total


def _offload(plan: Plan, states: dict[str, int], shape: StageShape) -> tuple[dict[str, int], dict[str, int], int]:
    """Move offloaded model states from the device to host or NVMe: (device, host, nvme)."""
    device, host, nvme = dict(states), dict.fromkeys(HOST_CATEGORIES, 0), 0
    opt, par = plan.offload.optimizer, plan.offload.param
    shard = -(-shape.params // plan.parallel.dp)
    if opt.device != "none":
        ratio = opt.ratio if plan.zero.stage == 3 else 1.0
        moved = {k: int(device[k] * ratio) for k in ("optimizer_states", "master_weights")}
        for k, v in moved.items():
            device[k] -= v
        # The offloaded step reads fp32 gradients from host memory (ZeRO-Offload, section 4.1).
        host["gradients"] = int(shard * 4 * ratio)
        if opt.device == "cpu":
            host.update(moved)
        else:
            nvme += sum(moved.values())
            # runtime/offload/nvme.py: buffer_count tiles of master + moments, each tile
            # min(sub_group_size, buffer_size) elements (the whole shard at most).
            tile = min(plan.zero.sub_group_size, opt.buffer_size, shard)
            host["swap_buffers"] += min(opt.buffer_count, -(-shard // tile)) * tile * 4 * 3
    if plan.zero.stage == 3 and par.device != "none":
        e_p = BYTES[plan.precision.param_dtype]
        persistent = persistent_elements(shape, threshold=plan.zero.param_persistence_threshold,
                                         cap=plan.zero.model_persistence_threshold) * e_p
        moved_params = device["parameters"] - persistent
        device["parameters"] = persistent
        if par.device == "cpu":
            host["parameters"] = moved_params
        else:
            nvme += moved_params
            host["swap_buffers"] += min(par.buffer_count * par.buffer_size, shape.params) * e_p
    return device, host, nvme


def _stage_estimate(plan: Plan, model: ModelSpec, shape: StageShape) -> MemoryEstimate:
    z = plan.zero
    persistent = (persistent_elements(shape, threshold=z.param_persistence_threshold,
                                      cap=z.model_persistence_threshold) if z.stage == 3 else 0)
    states = model_states(params=shape.params, dp=plan.parallel.dp, stage=z.stage,
                          param_dtype=plan.precision.param_dtype, optimizer=plan.optimizer.type,
                          momentum=plan.optimizer.momentum, persistent=persistent)
    device, host, nvme = _offload(plan, states, shape)
    device["activations"], host["activations"] = stage_activations(plan, model, shape)
    device["comm_buffers"] = comm_buffers(plan, shape, model=model)
    device["overhead"] = RUNTIME_OVERHEAD[plan.world.device]
    return MemoryEstimate(device={k: device[k] for k in DEVICE_CATEGORIES}, host=host, nvme=nvme,
                          nproc_per_node=plan.world.nproc_per_node)


def estimate_memory(plan: Plan, model: ModelSpec, *, calibration: Calibration | None = None) -> MemoryEstimate:
    """Predicted bytes per rank by category for the fullest pipeline stage's rank.

    Device categories: parameters, gradients, optimizer_states, master_weights, activations,
    comm_buffers, overhead. Host (per rank): offloaded parameters, fp32 gradients, optimizer
    states, masters, checkpointed activations, swap buffers. NVMe: offloaded bytes per rank.
    """
    shapes = stage_shapes(model, tp=plan.parallel.tp, pp=plan.parallel.pp)
    estimates = [_stage_estimate(plan, model, s) for s in shapes]
    worst = max(estimates, key=lambda m: (m.device_total, sum(m.host.values())))
    if calibration is None:
        return worst
    device, host = calibration.apply(worst.device, worst.host)
    note = f"calibrated from {calibration.source}" if calibration.source else "calibrated"
    return MemoryEstimate(device=device, host=host, nvme=worst.nvme, nproc_per_node=worst.nproc_per_node,
                          notes=(note,))
