"""Predicted step time of a Plan from a ClusterSpec's rates: good enough to rank plans.

Terms, in seconds per optimizer step on the busiest rank:
- compute: the stage's matrix-product FLOPs per step (flops.py: forward, backward and, with
  activation checkpointing, the blocks' recomputed forward; about 6 per parameter per token,
  Kaplan et al. 2020, section 2.1, plus attention's score and value products), at the
  cluster's matmul rate for the training dtype.
- pipeline bubble: (pp - 1) / m of the compute, (pp - 1) / (v m) with the interleaved schedule's
  v chunks per stage (Narayanan et al. 2021, section 2.2), whose v times as many point-to-point
  messages comm.py counts.
- communication: per collective, calls * ring steps * latency + bytes / bandwidth (comm.py),
  at intra- or inter-node rates depending on whether the group spans nodes (the plan's
  layout, schemas/layout.py), at the rate measured for that kind of collective where
  the cluster has one (gloo's all-gather and reduce-scatter are several times slower than its
  all-reduce). Stage 3 gathers each module's parameters on its own, forward and backward of
  every micro-step, so its calls, and their latency, grow with modules x micro-steps. Gradient reductions overlap the backward when
  overlap_comm is on (always at stage 0 reducing in place: runtime/zero/comm.py; without it
  the runtime keeps one bucket in flight, counted here as exposed), ZeRO-3's
  parameter gathers overlap compute when prefetching; what does not fit under the compute, and
  at least the last bucket, stays exposed. On CPU ranks nothing overlaps (the collectives run
  on the compute's cores).
- optimizer step: memory-bound (Adam reads master, gradient and two moments, writes three
  of them and the 16-bit copy), at device memory bandwidth, host memory bandwidth when
  offloaded, plus NVMe reads and writes of the swapped state.
- offload traffic: gradients to the host and parameters back (ZeRO-Offload), ZeRO-3
  parameter fetches per micro-batch, at host<->device and disk rates.
- framework overhead (micro_step_overhead, layer_overhead): per micro-step, a fixed cost plus
  one per transformer block (dispatch,
  autograd, hooks; `ClusterRates.micro_step_overhead`, `layer_overhead`, which `zeroplan
  probe` measures). It is what makes many small micro-batches slower than a few large ones
  at the same global batch, where every other term is equal.
- gradient copies: the memory traffic of handling gradients (gradient_bytes), at device memory
  bandwidth: each micro-step's gradient is written, then added into the fp32 accumulation
  buffer (stages 0-1) or packed into reduce buckets whose reduced slice is added into the
  shard (stages 2-3); buckets and results are copied at the boundary; parameters are copied
  back from the master or the gathered buffer after the step; stage 3 writes every gathered
  buffer.
Terms are added (no overlap unless overlap_comm or prefetching says so); the prediction is as
optimistic as the rates (nominal presets more so).
"""

from __future__ import annotations

from zeroplan.schemas import ClusterSpec, ModelSpec, Plan
from zeroplan.schemas.layout import Topology, crossing_dims
from zeroplan.schemas.plan import ParallelPlan

from .comm import Collective, stage_collectives
from .flops import peak_flops, step_flops
from .memory import BYTES, MASTER_BYTES, optimizer_state_bytes
from .shapes import StageShape, persistent_elements, publishing, stage_shapes
from .shards import chunk, gradient_stage, params_view_master, reduces_in_place


def _spans_nodes(plan: Plan, dim: str) -> bool:
    """Whether a group along `dim` has ranks on two nodes, by the layout the runtime builds;
    the `world` group (every rank) whenever there are several nodes."""
    if dim == "world":
        return plan.world.nnodes > 1
    p = plan.parallel
    topology = Topology(dp=p.dp, tp=p.tp, pp=p.pp, order=plan.layout.order)
    return dim in crossing_dims(topology, nproc_per_node=plan.world.nproc_per_node)


def collective_time(c: Collective, *, plan: Plan, cluster: ClusterSpec) -> float:
    """Seconds for one kind of collective over a step (latency + bytes / bandwidth)."""
    r = cluster.rates
    inter = _spans_nodes(plan, c.dim)
    latency = r.inter_node_latency if inter else r.intra_node_latency
    return c.calls * c.ring_steps * latency + c.bytes / r.collective_bandwidth(c.op, inter_node=inter)


def compute_seconds(plan: Plan, model: ModelSpec, cluster: ClusterSpec, shape: StageShape) -> float:
    """Forward + backward matmul time of one stage's rank over a step."""
    tokens = plan.batch.micro_batch_size * plan.batch.gradient_accumulation_steps * model.seq_len
    flops = step_flops(model, tokens=tokens, layers=shape.layers, head=shape.last, tp=plan.parallel.tp,
                       recompute=plan.activation_checkpointing.enabled)
    return flops.total / peak_flops(cluster, dtype=plan.precision.param_dtype)


def _overlappable(plan: Plan, c: Collective) -> bool:
    """Whether a collective can hide under compute. Not on CPU ranks: gloo's threads run on the
    cores the rank computes on, so its collectives take their time from the compute."""
    if c.dim != "dp" or c.phase == "step" or plan.world.device == "cpu":
        return False
    if c.op == "all_gather":  # ZeRO-3 prefetch
        return plan.zero.prefetch_bucket_size > 0
    return plan.zero.overlap_comm or reduces_in_place(stage=plan.zero.stage,
                                                      reduce_bytes=BYTES[plan.precision.reduce_dtype])


def exposed_comm(plan: Plan, cluster: ClusterSpec, collectives: list[Collective], *,
                 compute: float) -> dict[str, float]:
    """Seconds of communication not hidden under compute, by parallel dimension.

    Forward gets a third of the compute and backward two thirds (the 2:4 FLOP split).
    """
    window = {"forward": compute / 3, "backward": 2 * compute / 3}
    hidden_load = {"forward": 0.0, "backward": 0.0}
    last_bucket = {"forward": 0.0, "backward": 0.0}
    exposed = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "world": 0.0}
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


def framework_seconds(plan: Plan, cluster: ClusterSpec, shape: StageShape) -> dict[str, float]:
    """Fixed per-micro-step work: once per micro-step plus once per transformer block, apart
    (their rates are fitted apart: autotune/learned_cost.py)."""
    rates = cluster.rates
    micro_steps = plan.batch.gradient_accumulation_steps
    return {"micro_step_overhead": micro_steps * rates.micro_step_overhead,
            "layer_overhead": micro_steps * shape.layers * rates.layer_overhead}


def gradient_bytes(plan: Plan, shape: StageShape) -> int:
    """Bytes one rank reads and writes per step handling gradients and published parameters.

    Per micro-step: autograd writes the gradient (e_p); stages 0-1 add it into the fp32
    accumulation buffer (read e_p, read and write 4); stages 2-3 pack it into reduce buckets
    (read e_p, write e_r) and add the reduced slice into the fp32 shard (read e_r, read and
    write 4, over the shard). At the boundary, stages 0-1 pack the accumulated gradient
    (read 4, write e_r) and write the result back (read e_r, write 4; a shard at stage 1),
    except that stage 0 reducing in place only averages the buffer (read and write 4); stage 1
    with one micro-batch per step takes stage 2's path (`gradient_stage`).
    After the step the parameters are rewritten: from the master at stage 0 (read 4, write
    e_p; nothing where they are its views, `params_view_master`), from the gathered buffer at
    stages 1-2 (read and write e_p; only this rank's chunk where a parameter is gathered into
    its own storage, `_rewritten`). Stage 3 writes each
    gathered buffer, forward and backward of every micro-step.
    """
    z, accum, dp = plan.zero, plan.batch.gradient_accumulation_steps, plan.parallel.dp
    e_p, e_r, psi = BYTES[plan.precision.param_dtype], BYTES[plan.precision.reduce_dtype], shape.params
    shard = -(-psi // dp) if z.stage >= 1 else psi
    if reduces_in_place(stage=z.stage, reduce_bytes=e_r):
        per_micro = psi * (e_p + e_p + 8)
        boundary = psi * 8
    elif gradient_stage(stage=z.stage, accumulation=accum) <= 1:
        per_micro = psi * (e_p + e_p + 8)
        boundary = psi * (4 + e_r) + shard * (e_r + 4)
    else:
        per_micro = psi * (e_p + e_p + e_r) + shard * (e_r + 8)
        boundary = 0
    publish = {0: psi * (4 + e_p), 1: 2 * _rewritten(plan, shape) * e_p, 2: 2 * _rewritten(plan, shape) * e_p,
               3: 0}[z.stage]
    if params_view_master(stage=z.stage, param_bytes=e_p):
        publish = 0
    gathered = 0
    if z.stage == 3 and dp > 1:
        gathered = 2 * accum * (psi - persistent_elements(shape, threshold=z.param_persistence_threshold,
                                                          cap=z.model_persistence_threshold)) * e_p
    return accum * per_micro + boundary + publish + gathered


def _rewritten(plan: Plan, shape: StageShape) -> int:
    """Elements stages 1-2 copy into the parameters when publishing them: a bucket's whole
    result from its gather buffer; of a parameter gathered into its own storage, this rank's
    chunk (compiler.shapes.publishing)."""
    return sum(chunk(shape.tensors[g.start], plan.parallel.dp) if g.in_place else sum(shape.tensors[g.start:g.end])
               for g in publishing(plan, shape))


def bubble_fraction(parallel: ParallelPlan) -> float:
    """Idle time of a pipeline step as a share of the compute: (pp - 1) / m for GPipe and 1F1B,
    (pp - 1) / (v m) interleaved over v chunks per stage (Narayanan et al. 2021, sections 2.2.1
    and 2.2.2; runtime/parallel/pipeline_schedules.py `makespan` simulates it)."""
    if parallel.pp == 1:
        return 0.0
    return (parallel.pp - 1) / (parallel.pipeline_virtual_stages * parallel.pipeline_micro_batches)


def step_time(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> dict[str, float]:
    """Seconds per step by term for the slowest pipeline stage; the sum is the prediction."""
    best: dict[str, float] = {}
    p = plan.parallel
    for shape in stage_shapes(model, tp=p.tp, pp=p.pp, method=p.pipeline_partition_method):
        compute = compute_seconds(plan, model, cluster, shape)
        terms = {"compute": compute, "pipeline_bubble": compute * bubble_fraction(p)}
        comm = exposed_comm(plan, cluster, stage_collectives(plan, model, shape), compute=compute)
        terms.update({f"{dim}_comm": t for dim, t in comm.items()})
        terms["optimizer_step"] = optimizer_seconds(plan, cluster, shape)
        terms["offload_transfer"] = offload_seconds(plan, cluster, shape)
        terms.update(framework_seconds(plan, cluster, shape))
        terms["gradient_copies"] = gradient_bytes(plan, shape) / cluster.rates.memory_bandwidth
        if sum(terms.values()) > sum(best.values()):
            best = terms
    return best
