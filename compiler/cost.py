"""Predicted step time of a Plan from a ClusterSpec's rates: good enough to rank plans.

Terms, in seconds per optimizer step on the busiest rank:
- compute: 6 FLOPs per parameter per token (2 forward, 4 backward; Kaplan et al. 2020,
  section 2.1), 8 with full activation checkpointing (one more forward), plus attention's
  score and value products, 12 * layers * seq * hidden per token (16 when recomputed;
  Narayanan et al. 2021, appendix), at the cluster's matmul rate for the training dtype.
- pipeline bubble: (pp - 1) / m of the compute (Narayanan et al. 2021, section 2.2).
- communication: per collective, calls * ring steps * latency + bytes / bandwidth (comm.py),
  at intra- or inter-node rates depending on whether the group spans nodes (ranks are laid
  out tp fastest, then dp, then pp). Gradient reductions overlap the backward when
  overlap_comm is on, ZeRO-3's parameter gathers overlap compute when prefetching; what does
  not fit under the compute, and at least the last bucket, stays exposed.
- optimizer step: memory-bound (Adam reads master, gradient and two moments, writes three
  of them and the 16-bit copy), at device memory bandwidth, host memory bandwidth when
  offloaded, plus NVMe reads and writes of the swapped state.
- offload traffic: gradients to the host and parameters back (ZeRO-Offload), ZeRO-3
  parameter fetches per micro-batch, at host<->device and disk rates.
Terms are added; the prediction is as optimistic as the rates (nominal presets more so).
"""

from __future__ import annotations

from zeroplan.schemas import ClusterSpec, ModelSpec, Plan

from .comm import Collective, stage_collectives
from .memory import BYTES, MASTER_BYTES, optimizer_state_bytes
from .shapes import StageShape, persistent_elements, stage_shapes


def _spans_nodes(plan: Plan, dim: str) -> bool:
    p, per_node = plan.parallel, plan.world.nproc_per_node
    if plan.world.nnodes == 1:
        return False
    return {"tp": p.tp, "dp": p.tp * p.dp, "pp": p.tp * p.dp * p.pp}[dim] > per_node


def collective_time(c: Collective, *, plan: Plan, cluster: ClusterSpec) -> float:
    """Seconds for one kind of collective over a step (latency + bytes / bandwidth)."""
    r = cluster.rates
    if _spans_nodes(plan, c.dim):
        bandwidth, latency = r.inter_node_bandwidth, r.inter_node_latency
    else:
        bandwidth, latency = r.intra_node_bandwidth, r.intra_node_latency
    return c.calls * c.ring_steps * latency + c.bytes / bandwidth


def compute_seconds(plan: Plan, model: ModelSpec, cluster: ClusterSpec, shape: StageShape) -> float:
    """Forward + backward matmul time of one stage's rank over a step."""
    recompute = plan.activation_checkpointing.enabled
    tokens = plan.batch.micro_batch_size * plan.batch.gradient_accumulation_steps * model.seq_len
    dense = (8 if recompute else 6) * shape.params * tokens
    attention = (16 if recompute else 12) * shape.layers * model.seq_len * model.hidden * tokens // plan.parallel.tp
    rates = cluster.rates
    rate = rates.matmul_flops_fp32 if plan.precision.param_dtype == "fp32" else rates.matmul_flops_16bit
    return (dense + attention) / rate


def _overlappable(plan: Plan, c: Collective) -> bool:
    if c.dim != "dp" or c.phase == "step":
        return False
    if c.op == "all_gather":  # ZeRO-3 prefetch
        return plan.zero.prefetch_bucket_size > 0
    return plan.zero.overlap_comm


def exposed_comm(plan: Plan, cluster: ClusterSpec, collectives: list[Collective], *,
                 compute: float) -> dict[str, float]:
    """Seconds of communication not hidden under compute, by parallel dimension.

    Forward gets a third of the compute and backward two thirds (the 2:4 FLOP split).
    """
    window = {"forward": compute / 3, "backward": 2 * compute / 3}
    hidden_load = {"forward": 0.0, "backward": 0.0}
    last_bucket = {"forward": 0.0, "backward": 0.0}
    exposed = {"dp": 0.0, "tp": 0.0, "pp": 0.0}
    for c in collectives:
        t = collective_time(c, plan=plan, cluster=cluster)
        if _overlappable(plan, c):
            hidden_load[c.phase] += t
            last_bucket[c.phase] = max(last_bucket[c.phase], t / max(c.calls, 1))
        else:
            exposed[c.dim] += t
    for phase, load in hidden_load.items():
        if load:
            exposed["dp"] += max(load - window[phase], last_bucket[phase])
    return exposed


def optimizer_seconds(plan: Plan, cluster: ClusterSpec, shape: StageShape) -> float:
    """Memory-bound optimizer step over the rank's shard, on the device or the host."""
    shard = -(-shape.params // plan.parallel.dp) if plan.zero.stage >= 1 else shape.params
    mixed = plan.precision.param_dtype != "fp32"
    state = optimizer_state_bytes(optimizer=plan.optimizer.type, momentum=plan.optimizer.momentum)
    # read: master (or fp32 params), fp32 gradient, states; write: master, states, 16-bit copy
    per_elem = MASTER_BYTES + 4 + state + MASTER_BYTES + state + (BYTES[plan.precision.param_dtype] if mixed else 0)
    opt, rates = plan.offload.optimizer, cluster.rates
    ratio = (opt.ratio if plan.zero.stage == 3 else 1.0) if opt.device != "none" else 0.0
    seconds = shard * per_elem * (1 - ratio) / rates.memory_bandwidth
    seconds += shard * per_elem * ratio / rates.host_memory_bandwidth
    if opt.device == "nvme":
        swapped = shard * ratio * (state + MASTER_BYTES)
        seconds += swapped / rates.disk_read_bandwidth + swapped / rates.disk_write_bandwidth
    return seconds


def offload_seconds(plan: Plan, cluster: ClusterSpec, shape: StageShape) -> float:
    """Host<->device and disk traffic of offloaded optimizer state and parameters."""
    rates, z, accum = cluster.rates, plan.zero, plan.batch.gradient_accumulation_steps
    e_p, e_r = BYTES[plan.precision.param_dtype], BYTES[plan.precision.reduce_dtype]
    shard = -(-shape.params // plan.parallel.dp)
    seconds = 0.0
    if plan.offload.optimizer.device != "none":
        grad_copies = accum if z.stage >= 2 else 1  # stage 2-3 move each micro-batch's partition
        seconds += shard * (grad_copies * e_r + e_p) / rates.host_to_device_bandwidth
    if z.stage == 3 and plan.offload.param.device != "none":
        persistent = persistent_elements(shape, threshold=z.param_persistence_threshold,
                                         cap=z.model_persistence_threshold)
        fetched = 2 * accum * -(-(shape.params - persistent) // plan.parallel.dp) * e_p
        seconds += fetched / rates.host_to_device_bandwidth
        if plan.offload.param.device == "nvme":
            seconds += fetched / rates.disk_read_bandwidth
    return seconds


def step_time(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> dict[str, float]:
    """Seconds per step by term for the slowest pipeline stage; the sum is the prediction."""
    best: dict[str, float] = {}
    for shape in stage_shapes(model, tp=plan.parallel.tp, pp=plan.parallel.pp):
        compute = compute_seconds(plan, model, cluster, shape)
        p = plan.parallel
        terms = {"compute": compute,
                 "pipeline_bubble": compute * (p.pp - 1) / p.pipeline_micro_batches if p.pp > 1 else 0.0}
        comm = exposed_comm(plan, cluster, stage_collectives(plan, model, shape), compute=compute)
        terms.update({f"{dim}_comm": t for dim, t in comm.items()})
        terms["optimizer_step"] = optimizer_seconds(plan, cluster, shape)
        terms["offload_transfer"] = offload_seconds(plan, cluster, shape)
        if sum(terms.values()) > sum(best.values()):
            best = terms
    return best
