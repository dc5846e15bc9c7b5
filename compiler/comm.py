"""Communication per optimizer step: bytes each rank sends and collective calls, per collective
and parallel dimension, following the plan's bucket sizes.

Bytes are those of the ring algorithms NCCL and gloo use (Patarasuk & Yuan 2009, "Bandwidth
optimal all-reduce algorithms for clusters of workstations"; Thakur et al. 2005): for a tensor
of S bytes over n ranks, each rank sends 2(n-1)/n * S in an all-reduce and (n-1)/n * S in an
all-gather or a reduce-scatter (S being the gathered size). That is NCCL's "bus bandwidth"
accounting, so dividing by the link bandwidth gives the time. Calls count collective launches;
a ring call takes 2(n-1) (all-reduce) or n-1 latency-bound steps.

Per stage (Rajbhandari et al. 2020, section 7): stage 0 all-reduces gradients once per step in
reduce_bucket_size buckets (2 * Psi); stage 1 reduces once per step (reduce-scatter, or
all-reduce when reduce_scatter is off) and all-gathers updated parameters in
allgather_bucket_size chunks; stage 2 reduce-scatters every micro-batch's gradients per bucket,
then all-gathers parameters; stage 3 all-gathers parameters in forward and again in backward of
every micro-batch, one call per module owning a non-persistent parameter (as DeepSpeed's hooks
and zeroplan's runtime do), and reduce-scatters gradients (3 * Psi, 1.5x data parallelism). Tensor
parallelism all-reduces activations twice per block forward and twice backward (Shoeybi et al.
2019, figure 4), twice more when checkpointing recomputes the forward, plus the vocab-parallel
embedding, LM head and loss (see _tp_collectives); with sequence parallelism each becomes an
all-gather and a reduce-scatter (see _sp_collectives); pipelining sends a header and an
activation forward and one gradient backward per micro-batch and stage boundary, and sums
the tied embedding and the gradient norm over stages (see _pp_collectives).
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.schemas import ModelSpec, Plan

from .memory import BYTES
from .shapes import StageShape, embedding_tensors, persistent_tensors, publishing, stage_shapes, tp_replicated_tensors
from .shards import chunk, pack_buckets, padded


@dataclass(frozen=True)
class Collective:
    """One kind of collective a rank takes part in during a step."""

    dim: str
    """Parallel dimension of its group: dp, tp, pp, or world (every rank, when tp or pp > 1)."""
    op: str
    """all_reduce, reduce_scatter, all_gather or send_recv."""
    phase: str
    """When it runs: forward, backward (both can overlap compute) or step (after backward)."""
    group: int
    """Ranks in the group."""
    bytes: int
    """Bytes this rank sends per step (ring accounting)."""
    calls: int
    """Collective launches per step."""

    @property
    def key(self) -> str:
        return f"{self.dim}.{self.op}"

    @property
    def ring_steps(self) -> int:
        """Latency-bound steps of one call."""
        if self.op == "send_recv":
            return 1
        return (2 if self.op == "all_reduce" else 1) * (self.group - 1)


def ring_bytes(op: str, size_bytes: int, n: int) -> int:
    """Bytes one rank sends in a ring `op` over a tensor of `size_bytes` (gathered size)."""
    if n <= 1:
        return 0
    factor = 2 if op == "all_reduce" else 1
    return factor * (n - 1) * size_bytes // n


def _buckets(shape: StageShape, *, world: int, bucket: int, reverse: bool) -> int:
    """Collective calls over the stage's tensors in buckets: the runtime's packing (shards.py)."""
    return len(pack_buckets(shape.tensors, world=world, max_elements=bucket, reverse=reverse))


def _dp_collectives(plan: Plan, shape: StageShape) -> list[Collective]:
    z, n, accum = plan.zero, plan.parallel.dp, plan.batch.gradient_accumulation_steps
    if n == 1:
        return []
    e_p, e_r = BYTES[plan.precision.param_dtype], BYTES[plan.precision.reduce_dtype]
    sharded = padded(shape.tensors, world=n)  # every tensor padded to a multiple of dp
    out = []
    if z.stage == 0:
        out.append(Collective("dp", "all_reduce", "backward", n, ring_bytes("all_reduce", shape.params * e_r, n),
                              _buckets(shape, world=1, bucket=z.reduce_bucket_size, reverse=True)))
    else:
        grad_op = "reduce_scatter" if z.reduce_scatter or z.stage == 3 else "all_reduce"
        times = 1 if z.stage == 1 else accum  # stage 1 reduces once per step, 2-3 every micro-batch
        out.append(Collective("dp", grad_op, "backward", n, times * ring_bytes(grad_op, sharded * e_r, n),
                              times * _buckets(shape, world=n, bucket=z.reduce_bucket_size, reverse=True)))
        # The global gradient norm: each rank's squared shard norm (fp32; with tp, replicated and
        # split parameters apart), summed over dp.
        norm = 4 * (2 if plan.parallel.tp > 1 else 1)
        out.append(Collective("dp", "all_reduce", "step", n, ring_bytes("all_reduce", norm, n), 1))
        if plan.optimizer.type == "Lamb":  # each tensor's squared ||p|| and ||update||, fp64 (optim_lamb.py)
            out.append(Collective("dp", "all_reduce", "step", n, ring_bytes("all_reduce", 16 * len(shape.tensors), n),
                                  1))
    if plan.optimizer.missing_grads == "skip":  # which parameters got a gradient on some rank: a byte each
        out.append(Collective("dp", "all_reduce", "step", n, ring_bytes("all_reduce", len(shape.tensors), n), 1))
    if plan.precision.loss_scaling.enabled and plan.parallel.tp == plan.parallel.pp == 1:
        out.append(_overflow_flag("dp", n))  # dp is the world
    if z.stage in (1, 2):
        out.append(Collective("dp", "all_gather", "step", n, ring_bytes("all_gather", sharded * e_p, n),
                              len(publishing(plan, shape))))
    if z.stage == 3:
        out += _stage3_gathers(plan, shape)
    return out


def _stage3_gathers(plan: Plan, shape: StageShape) -> list[Collective]:
    """ZeRO-3's all-gathers, as runtime/zero/stage3.py launches them: per micro-batch, one per
    module owning a non-persistent parameter in forward, and again in backward for every such
    module but the embeddings (an embedding's backward needs only its indices; a tied head keeps
    the matrix gathered until its gradient is whole); after the step, the persistent tensors,
    one call per run of consecutive ones within an all-gather bucket."""
    z, n, accum, e = plan.zero, plan.parallel.dp, plan.batch.gradient_accumulation_steps, BYTES[plan.precision.param_dtype]
    flags = persistent_tensors(shape.tensors, threshold=z.param_persistence_threshold,
                               cap=z.model_persistence_threshold)
    flat = iter([*flags, *[flags[0]] * (sum(len(m) for m in shape.modules) - len(flags))])  # a tied head is the embedding
    gathered = [[t for t in module if not next(flat)] for module in shape.modules]
    embeddings = len(shape.embedding_modules)
    forward = [padded(m, world=n) for m in gathered if m]
    backward = [padded(m, world=n) for m in gathered[embeddings:] if m]
    steps = [padded(shape.tensors[g.start:g.end], world=n) for g in publishing(plan, shape)]
    return [Collective("dp", "all_gather", "forward", n, accum * ring_bytes("all_gather", sum(forward) * e, n),
                       accum * len(forward)),
            Collective("dp", "all_gather", "backward", n, accum * ring_bytes("all_gather", sum(backward) * e, n),
                       accum * len(backward)),
            Collective("dp", "all_gather", "step", n, ring_bytes("all_gather", sum(steps) * e, n), len(steps))]


def _tp_collectives(plan: Plan, model: ModelSpec, shape: StageShape) -> list[Collective]:
    """Megatron's f and g operators (runtime/parallel/tensor_comm.py), per micro-batch: forward,
    two activation all-reduces per block (attention and MLP outputs), one for the vocab-split
    embedding (first stage) and two small fp32 ones for the vocab-parallel loss (last stage:
    the row maxima, then [sum of exp, target logit]); backward, two per block (attention and MLP
    inputs) and one for the LM head's input (last stage), and with `partition_activations` the
    all-gather of each recomputed block's input from its tp slices (runtime/checkpointing.py);
    at the step, the squared norm of the tp-split gradients (`_tp_step`)."""
    t = plan.parallel.tp
    if t == 1:
        return []
    if plan.parallel.sequence_parallel:
        return _sp_collectives(plan, model, shape)
    e, m = BYTES[plan.precision.param_dtype], plan.batch.gradient_accumulation_steps
    tokens = model.seq_len * plan.batch.micro_batch_size
    per_call = ring_bytes("all_reduce", e * tokens * model.hidden, t)
    forward_per_layer = 2 * (2 if plan.activation_checkpointing.enabled else 1)
    embedding = 1 if shape.index == 0 else 0  # the vocab-split embedding sums its partial outputs
    head = 1 if shape.last else 0
    fwd_calls = m * (forward_per_layer * shape.layers + embedding)
    bwd_calls = m * (2 * shape.layers + head)
    loss_bytes = m * head * (ring_bytes("all_reduce", 4 * tokens, t) + ring_bytes("all_reduce", 8 * tokens, t))
    out = [Collective("tp", "all_reduce", "forward", t, fwd_calls * per_call + loss_bytes, fwd_calls + 2 * m * head),
           Collective("tp", "all_reduce", "backward", t, bwd_calls * per_call, bwd_calls)]
    ac = plan.activation_checkpointing
    if ac.enabled and ac.partition_activations:  # each rank's slice is zero-padded to 1/t of the whole
        gathered = -(-tokens * model.hidden // t) * t * e
        out.append(Collective("tp", "all_gather", "backward", t, m * shape.layers * ring_bytes("all_gather", gathered, t),
                              m * shape.layers))
    return out + _tp_step(plan)


def _tp_step(plan: Plan) -> list[Collective]:
    """At the step, over tp: the squared norm of the tp-split gradients (fp32)."""
    t = plan.parallel.tp
    return [Collective("tp", "all_reduce", "step", t, ring_bytes("all_reduce", 4, t), 1)]


def _overflow_flag(dim: str, group: int) -> Collective:
    """fp16's overflow flag (one fp32 element), agreed by every rank in one all-reduce
    (runtime/engine.py `_overflow`, runtime/comm.py `world_collectives`)."""
    return Collective(dim, "all_reduce", "step", group, ring_bytes("all_reduce", 4, group), 1)


def _world_collectives(plan: Plan) -> list[Collective]:
    """Over every rank, when tp or pp > 1 (with dp alone, the dp group is the world and
    `_dp_collectives` counts it): fp16's overflow flag."""
    p = plan.parallel
    if not plan.precision.loss_scaling.enabled or p.tp == p.pp == 1:
        return []
    return [_overflow_flag("world", p.dp * p.tp * p.pp)]


def _sp_collectives(plan: Plan, model: ModelSpec, shape: StageShape) -> list[Collective]:
    """Sequence parallelism (Korthikanti et al. 2022, section 4.2.2; runtime/parallel/sequence.py),
    per micro-batch: each all-reduce of an activation becomes a reduce-scatter (forward: after a
    row-parallel layer and the embedding) or an all-gather (forward: before a column-parallel
    layer and the LM head), the same ring bytes in twice the calls. Backward mirrors them, and
    each column-parallel layer all-gathers its kept sequence shard again for its weight gradient
    (Megatron's way: the gathered input is not kept), so a block costs 2 all-gathers and 2
    reduce-scatters forward (again when recomputed) and 4 all-gathers and 2 reduce-scatters
    backward; the LM head, an all-gather forward and one of each backward; the embedding, a
    reduce-scatter forward and an all-gather backward. The loss's two small all-reduces stay; at the step, the squared norm of the tp-split
    gradients, and one all-reduce summing the fp32 gradient shard of the tp-replicated tensors
    (each tp rank's covers its part of the sequence only)."""
    t, e, m = plan.parallel.tp, BYTES[plan.precision.param_dtype], plan.batch.gradient_accumulation_steps
    tokens = model.seq_len * plan.batch.micro_batch_size
    gather, scatter = (ring_bytes(op, e * tokens * model.hidden, t) for op in ("all_gather", "reduce_scatter"))
    passes = 2 if plan.activation_checkpointing.enabled else 1
    embedding, head = (1 if shape.index == 0 else 0), (1 if shape.last else 0)
    calls = {("forward", "all_gather"): passes * 2 * shape.layers + head,
             ("forward", "reduce_scatter"): passes * 2 * shape.layers + embedding,
             ("backward", "all_gather"): 4 * shape.layers + head + embedding,
             ("backward", "reduce_scatter"): 2 * shape.layers + head}
    out = [Collective("tp", op, phase, t, m * n * (gather if op == "all_gather" else scatter), m * n)
           for (phase, op), n in calls.items()]
    if head:
        loss_bytes = m * (ring_bytes("all_reduce", 4 * tokens, t) + ring_bytes("all_reduce", 8 * tokens, t))
        out.append(Collective("tp", "all_reduce", "forward", t, loss_bytes, 2 * m))
    world = plan.parallel.dp if plan.zero.stage > 0 else 1  # stage 0 keeps the whole gradient
    replicated = 4 * padded(tp_replicated_tensors(model, shape), world=world) // world
    return out + _tp_step(plan) + [Collective("tp", "all_reduce", "step", t, ring_bytes("all_reduce", replicated, t), 1)]


PIPE_MAX_DIMS = 8
"""Most dimensions of a tensor passed between pipeline stages (the header's room for its shape)."""
PIPE_HEADER_ELEMENTS = 2 + PIPE_MAX_DIMS
"""int64 elements of the header sent before every activation: dtype code, ndim, dims
(runtime/parallel/pipeline_comm.py)."""


def _pp_collectives(plan: Plan, model: ModelSpec, shape: StageShape) -> list[Collective]:
    """What runtime/parallel/pipeline_engine.py sends per step (logged as `pp.<op>`). Per
    micro-batch and model chunk, to the next stage a header (shapes may change between
    micro-batches) and the activation, to the previous one the activation's gradient: [micro, seq, hidden] in the
    parameters' dtype, whole on every tp rank. `send_recv` counts the sends; every one is
    received once. At the step, fp32 all-reduces: on the first and last stage the tied
    embedding's gradient, this rank's ZeRO shard of it (the whole matrix at stage 0), over those
    two stages (Megatron's embedding group); over the pp group the squared gradient norm (fp16's
    overflow flag is the world's, `_world_collectives`). The loss the last stage broadcasts is
    reporting, after the step's count, as the dp loss average is."""
    p = plan.parallel
    if p.pp == 1:
        return []
    m, v = p.pipeline_micro_batches, p.pipeline_virtual_stages
    # Interleaved, each of the rank's v chunks sends on but the model's last (forward) and first
    # (backward): v times 1F1B's messages (Narayanan et al. 2021, section 2.2.2).
    forward, backward = v - (shape.index == p.pp - 1), v - (shape.index == 0)
    activation = BYTES[plan.precision.param_dtype] * model.seq_len * plan.batch.micro_batch_size * model.hidden
    out = [Collective("pp", "send_recv", "forward", 2, m * forward * (activation + 8 * PIPE_HEADER_ELEMENTS),
                      2 * m * forward),
           Collective("pp", "send_recv", "backward", 2, m * backward * activation, m * backward)]
    if model.tied_embeddings and (shape.index == 0 or shape.last):
        tied = chunk(embedding_tensors(model, tp=p.tp)[0], p.dp if plan.zero.stage else 1)
        out.append(Collective("pp", "all_reduce", "step", 2, ring_bytes("all_reduce", 4 * tied, 2), 1))
    out.append(Collective("pp", "all_reduce", "step", p.pp, ring_bytes("all_reduce", 4, p.pp), 1))
    return out


def stage_collectives(plan: Plan, model: ModelSpec, shape: StageShape) -> list[Collective]:
    """Every collective one rank of this stage takes part in per step."""
    return [*_dp_collectives(plan, shape), *_tp_collectives(plan, model, shape), *_pp_collectives(plan, model, shape),
            *_world_collectives(plan)]


def comm_volume(plan: Plan, model: ModelSpec) -> list[Collective]:
    """Collectives per step of the rank that sends the most (the busiest pipeline stage)."""
    p = plan.parallel
    shapes = stage_shapes(model, tp=p.tp, pp=p.pp, method=p.pipeline_partition_method)
    per_stage = [stage_collectives(plan, model, s) for s in shapes]
    return max(per_stage, key=lambda cs: sum(c.bytes for c in cs))


def summarize(collectives: list[Collective]) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, calls) per `dim.op` key, summed over phases, keys sorted."""
    sent: dict[str, int] = {}
    calls: dict[str, int] = {}
    for c in sorted(collectives, key=lambda c: c.key):
        sent[c.key] = sent.get(c.key, 0) + c.bytes
        calls[c.key] = calls.get(c.key, 0) + c.calls
    return sent, calls
