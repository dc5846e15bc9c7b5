"""Per-rank memory of a Plan, by category: `estimate_memory(plan, model)` is the one entry point.

Model states start from the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", section 3.1 and figure 1): mixed-precision Adam
keeps 16-bit parameters, gradients and K = 12 bytes of optimizer state per parameter (a 4-byte
fp32 master copy, 4-byte momentum, 4-byte variance), the master its own category here
(`master_weights`), sharded over N dp ranks from stage 1 (optimizer state and masters), 2 (also
gradients) and 3 (also parameters). The bytes are what zeroplan's runtime allocates
(runtime/zero), which differs from the paper in two ways:
- gradients accumulate and reduce in fp32 in every training dtype: a flat fp32 buffer of the
  whole model at stage 0; a whole fp32 accumulation buffer plus the fp32 gradient shard the
  reduce-scatter writes at stage 1 with gradient accumulation (without it, stage 2's); the
  shard at stages 2-3;
- the optimizer steps a flat fp32 master of its elements (zero/base.py `init_master`), a copy of
  the parameters at stages 1-2 and at stage 0 in bf16/fp16; at stage 0 in fp32 the parameters
  are views of it, and at stage 3 the partition is that master itself in fp32 training (a copy
  in the training dtype otherwise), plus the persistent parameters kept whole.
Stage 3 is handed the whole model, built on every rank (there is no sharded initialisation yet),
and releases it in `Stage3.attach`: that set-up moment is a phase of its own (below).
With AdamW in fp32 at 2 ranks that is 16, 16 (12 with one micro-batch per step), 12 and 8
bytes per parameter at stages 0-3
(tests/runtime/test_state_bytes.py checks every stage in fp32 and bf16 against what
`initialize` allocates; bench/memory_model.py measures the whole peak).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4 and equation 2); see `layer_activation_bytes`.

The rank's peak is the largest of phases that do not overlap in time (`training_phases`):
set-up (stage 3: the whole model beside its shards), the loss's backward (every stored
activation and the loss's temporaries), the rest of backward (ZeRO-3's gathered and
prefetched parameters beside the activations not yet freed), the gradient
reduction at the end of backward (its buffers; the activations not yet freed when buckets
launch during backward) and the publishing of the update (stages 1-2's all-gather). The
categories of an estimate are what is live at that peak, so they sum to it. On CPU the
runtime returns freed tensors to the operating system (runtime/host_memory.py), so the
process's resident memory follows these tensors rather than malloc's retained heap. Offloaded state
(ZeRO-Offload, Ren et al. 2021; ZeRO-Infinity, Rajbhandari et al. 2021) moves from the device
categories to host or NVMe.

Measured corrections are applied through a `Calibration` (calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from zeroplan.schemas import ModelSpec, Plan

from .calibration import DEVICE_CATEGORIES, HOST_CATEGORIES, Calibration
from .shapes import StageShape, persistent_elements, publishing, stage_shapes
from .shards import gradient_stage, padded, params_view_master, reduces_in_place

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
MASTER_BYTES = 4
"""fp32 master weights (PrecisionPlan.master_dtype is always fp32)."""
FIRST_STEPS_OVERHEAD = {"cuda": 0, "cpu": 30 << 20}
"""Bytes the first training steps allocate whatever the model's size, beyond a rank's start-up
(cpu, measured by bench/memory_model.py: autograd's engine and kernels' first-use buffers, the
tiny preset's training memory less its tensors; on cuda they are inside the context's figure)."""
RUNTIME_OVERHEAD = {"cuda": 1 << 30, "cpu": (283 << 20) + FIRST_STEPS_OVERHEAD["cpu"]}
"""Bytes a rank holds besides the tensors counted here, where `zeroplan probe` has not measured
the machine (ClusterSpec.runtime_overhead_bytes). cuda: the CUDA context, cuBLAS workspace and
NCCL buffers (typically 0.5-1.5 GiB). cpu: 283 MiB resident before the model is built
(interpreter, torch, the process group; torch 2.13 CPU, 2 gloo ranks) plus the first steps'."""


def runtime_overhead(*, device: str, measured: int | None) -> int:
    """A rank's bytes besides its tensors: the probe's start-up figure plus the first steps'
    allocations, else the default for the device."""
    return RUNTIME_OVERHEAD[device] if measured is None else measured + FIRST_STEPS_OVERHEAD[device]


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
    """Bytes of optimizer state per parameter, masters excluded: Adam's and Lamb's two fp32
    moments; Lion's momentum and Adagrad's sum of squares; SGD's momentum (if any)."""
    if optimizer in ("Adam", "AdamW", "Lamb"):
        return 8
    if optimizer in ("Lion", "Adagrad"):
        return 4
    return 4 if momentum > 0 else 0


def model_states(*, params: int, dp: int, stage: int, param_dtype: str, optimizer: str = "AdamW",
                 momentum: float = 0.0, persistent: int = 0, accumulation: int = 1) -> dict[str, int]:
    """Device bytes of parameters, gradients, optimizer states and masters on one dp rank, as
    zeroplan's runtime allocates them (runtime/zero/__init__.py `build_zero`; module docstring).

    `params` are the rank's (tp/pp slice of the) parameters; `persistent` of them stay whole at
    stage 3 (below the persistence threshold). Shards round up, as DeepSpeed pads partitions.
    Unlike the ZeRO paper's 2-byte 16-bit gradients, the runtime accumulates and reduces into
    fp32 buffers whatever the training dtype: the whole gradient at stage 0, a whole fp32
    accumulation buffer beside the gradient shard at stage 1 when `accumulation` (micro-batches
    per step) is above 1 (with one, stage 1 runs as stage 2: zero/stage12.py), the shard at
    stages 2-3. At stage 3
    the parameters are the partition (the fp32 master itself in fp32 training, a copy in the
    training dtype otherwise) plus the persistent ones kept whole; at stage 0 in fp32 they are
    views of the master (zero/stage0.py), so they cost nothing beside it.
    """
    e = BYTES[param_dtype]
    shard = -(-params // dp)
    state = optimizer_state_bytes(optimizer=optimizer, momentum=momentum)
    opt_elems = shard if stage >= 1 else params
    grads = {0: params, 1: params + shard}.get(gradient_stage(stage=stage, accumulation=accumulation), shard)
    if stage == 3:
        parameters = (persistent + (0 if param_dtype == "fp32" else shard)) * e
    elif params_view_master(stage=stage, param_bytes=e):
        parameters = 0
    else:
        parameters = params * e
    return {"parameters": parameters, "gradients": grads * 4, "optimizer_states": opt_elems * state,
            "master_weights": opt_elems * MASTER_BYTES}


def layer_activation_bytes(*, seq: int, micro: int, hidden: int, heads: int, ffn: int, kv_hidden: int | None = None,
                           tp: int = 1, element_bytes: int = 2, dropout: bool = False, flash: bool = False,
                           gated_mlp: bool = False, sequence_parallel: bool = False) -> int:
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
    With `sequence_parallel` (section 4.2.2, equation 4: sbh(34/t + 5as/(ht)) with dropout) the
    replicated part is split by t too: the norms, their inputs and the masks act on 1/t of the
    sequence, and the column-parallel layers keep their input's sequence shard and all-gather it
    again in backward, as Megatron-LM does (runtime/parallel/sequence.py).
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
    if sequence_parallel:
        return (replicated + attention + mlp + scores) // tp
    return replicated + (attention + mlp + scores) // tp


def head_activation_bytes(*, seq: int, micro: int, hidden: int, vocab: int, tp: int, element_bytes: int,
                          sequence_parallel: bool = False) -> int:
    """Final norm input, LM head input and the fp32 log-softmax the loss keeps (Korthikanti et al.
    2022, section 4.3: the output layer's 4sbv/t). The logits themselves are not kept: the LM
    head saves its input, and the cast to fp32 and log-softmax's backward need only outputs
    (measured: counting the logits too over-predicts the training memory by 4 bytes x sbv). With
    `sequence_parallel` the norm's and the head's inputs are this rank's 1/t of the sequence."""
    sb = seq * micro
    return 2 * element_bytes * sb * hidden // (tp if sequence_parallel else 1) + 4 * sb * vocab // tp


def in_flight(plan: Plan, stage: int) -> Fraction:
    """Micro-batches' worth of its activations a stage holds at once: 1F1B keeps pp - stage (at
    most m), GPipe all m (Narayanan et al. 2021, section 2.2); without pipelining one. Interleaved
    over v chunks, rank r holds 2 (pp - r - 1) + (v - 1) pp + 1 chunk-micro-batches (its warm-up
    and one more, runtime/parallel/pipeline_schedules.py; every chunk of every micro-batch when m = pp),
    each 1/v of its layers: on the first stage pp (1 + (pp - 1) / (pp v)) micro-batches,
    Korthikanti et al. 2022, section 4.2.3."""
    p = plan.parallel
    if p.pp == 1:
        return Fraction(1)
    m, v = p.pipeline_micro_batches, p.pipeline_virtual_stages
    if p.pipeline_schedule == "gpipe":
        return Fraction(m)
    if p.pipeline_schedule == "interleaved":
        chunks = m * v if m == p.pp else min(2 * (p.pp - stage - 1) + (v - 1) * p.pp + 1, m * v)
        return Fraction(chunks, v)
    return Fraction(min(p.pp - stage, m))


def loss_backward_bytes(*, seq: int, micro: int, vocab: int, tp: int) -> int:
    """fp32 temporaries the loss's backward holds beside every stored activation, at the start
    of backward: F.cross_entropy's two dense [tokens, vocab] gradients (the NLL's, then
    log-softmax's, while its saved output is alive); the vocabulary-parallel loss's one (its
    backward clones the saved softmax, runtime/parallel/tensor.py)."""
    return (2 if tp == 1 else 1) * 4 * seq * micro * vocab // tp


def stage_activations(plan: Plan, model: ModelSpec, shape: StageShape, *, loss: bool = True) -> tuple[int, int]:
    """(device, host) activation bytes of one stage's rank at its activation peak: with `loss`,
    while the loss's backward runs (its temporaries included), else just after it."""
    e, tp, ac = BYTES[plan.precision.param_dtype], plan.parallel.tp, plan.activation_checkpointing
    s, b, sp = model.seq_len, plan.batch.micro_batch_size, plan.parallel.sequence_parallel
    per_layer = layer_activation_bytes(
        seq=s, micro=b, hidden=model.hidden, heads=model.heads, ffn=model.ffn,
        kv_hidden=(model.kv_heads or model.heads) * model.head_dim, tp=tp, element_bytes=e,
        dropout=model.dropout > 0, flash=model.attention == "flash", gated_mlp=model.architecture == "llama",
        sequence_parallel=sp)
    head = 0
    if shape.last:
        head = (head_activation_bytes(seq=s, micro=b, hidden=model.hidden, vocab=model.vocab, tp=tp,
                                      element_bytes=e, sequence_parallel=sp)
                + (loss_backward_bytes(seq=s, micro=b, vocab=model.vocab, tp=tp) if loss else 0))
    n = in_flight(plan, shape.index)
    if not ac.enabled:
        return int(shape.layers * per_layer * n) + head, 0
    # Full recomputation (Korthikanti et al. 2022, section 4.2): keep each block's input
    # (2sbh in 16-bit, split by t when partitioned, or already a 1/t sequence shard with sequence
    # parallelism) and rebuild one block at a time in backward, after the head's backward has
    # freed the head's activations: the peak is the larger of the two moments.
    checkpoint = e * s * b * model.hidden // (tp if ac.partition_activations or sp else 1)
    stored = int(shape.layers * checkpoint * n)
    if ac.cpu_checkpointing:
        return max(per_layer, head), stored
    return stored + max(per_layer, head), 0


@dataclass(frozen=True)
class CommBuffers:
    """Bytes of communication buffers per phase of a step, as the runtime's BucketReducer and
    gathers allocate them (runtime/zero/comm.py). Bucket sizes count elements, as in DeepSpeed."""

    pipeline: int
    """Pipeline send/receive buffers, live with the activations."""
    gathered: int
    """ZeRO-3's gathered parameters in backward: the module in use plus the prefetch bucket,
    capped by stage3_max_live_parameters. Backward's first gather (the
    LM head's) comes after the loss's backward, so they meet the activations without the loss's
    temporaries."""
    reduction: int
    """At a gradient bucket's launch: its [W, chunk] buffer and the reduce-scatter's output (1/W
    of it) at stages 1-3 (the collectives work in place, gloo's too: runtime/comm.py); doubled
    when overlap_comm keeps two buckets in flight; none when the gradient buffer is the bucket
    (stage 0 reducing in fp32, compiler.shards.reduces_in_place). The gradients a bucket gathers are copied into it
    and let go (stages 2-3) or live in the flat fp32 buffer (stages 0-1, model states)."""
    publish: int
    """After the optimizer step, stages 1-2: the all-gather's output of updated parameters."""
    overlap: float
    """Share of the stored activations still alive when the first gradient bucket launches:
    buckets fill in reverse layer order, so with a bucket of 1/k of the rank's parameters about
    (k-1)/k of the backward is still ahead; one bucket for the whole rank launches after it."""


def comm_buffers(plan: Plan, shape: StageShape, *, model: ModelSpec) -> CommBuffers:
    z, p = plan.zero, plan.parallel
    e_p, e_r = BYTES[plan.precision.param_dtype], BYTES[plan.precision.reduce_dtype]
    pipeline = gathered = reduction = publish = 0
    overlap = 0.0
    if p.dp > 1:
        bucket = min(z.reduce_bucket_size, shape.params)
        scatter = z.stage >= 1
        if not reduces_in_place(stage=z.stage, reduce_bytes=e_r):
            reduction = int(bucket * e_r * (1 + (1 / p.dp if scatter else 0)) * (2 if z.overlap_comm else 1))
        overlap = max(0.0, 1 - bucket / shape.params) if shape.params else 0.0
        if z.stage in (1, 2):
            publish = _publish_buffers(plan, shape) * e_p
        if z.stage == 3:
            unit = max(shape.units)
            live = unit + min(z.prefetch_bucket_size, shape.params - unit)
            gathered = min(live, max(unit, z.max_live_parameters)) * e_p
    if p.pp > 1:
        pipeline = 2 * e_p * model.seq_len * plan.batch.micro_batch_size * model.hidden
    return CommBuffers(pipeline=pipeline, gathered=gathered, reduction=reduction, publish=publish, overlap=overlap)


def _publish_buffers(plan: Plan, shape: StageShape) -> int:
    """Elements of stages 1-2's gather buffers while the step's parameters are published
    (runtime/zero/base.py `gather_into_model`): every bucket's at once with overlap_comm, else
    the largest; none for parameters gathered into their own storage."""
    sizes = [padded(shape.tensors[g.start:g.end], world=plan.parallel.dp)
             for g in publishing(plan, shape) if not g.in_place]
    return sum(sizes) if plan.zero.overlap_comm else max(sizes, default=0)


def training_phases(*, activations: int, after_loss: int, buffers: CommBuffers,
                    setup_parameters: int) -> dict[str, dict[str, int]]:
    """What each phase of a step adds to the model states, by category (module docstring):
    the rank's peak is the largest. `activations` while the loss's backward runs, `after_loss`
    once it is done."""
    return {
        "setup": {"parameters": setup_parameters},
        "loss backward": {"activations": activations, "comm_buffers": buffers.pipeline},
        "backward": {"activations": after_loss, "comm_buffers": buffers.pipeline + buffers.gathered},
        "reduction": {"activations": int(after_loss * buffers.overlap),
                      "comm_buffers": buffers.reduction + (buffers.pipeline if buffers.overlap else 0)},
        "publish": {"comm_buffers": buffers.publish},
    }


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
        # fp32: the parameter shard is the master (counted, and moved, as master_weights); the
        # whole model the runtime keeps without offload is not kept when parameters live off-device.
        moved_params = 0 if e_p == 4 else device["parameters"] - persistent
        device["parameters"] = persistent
        if par.device == "cpu":
            host["parameters"] = moved_params
        else:
            nvme += moved_params
            host["swap_buffers"] += min(par.buffer_count * par.buffer_size, shape.params) * e_p
    return device, host, nvme


def _stage_estimate(plan: Plan, model: ModelSpec, shape: StageShape, *, overhead: int) -> MemoryEstimate:
    z = plan.zero
    persistent = (persistent_elements(shape, threshold=z.param_persistence_threshold,
                                      cap=z.model_persistence_threshold) if z.stage == 3 else 0)
    states = model_states(params=shape.params, dp=plan.parallel.dp, stage=z.stage,
                          param_dtype=plan.precision.param_dtype, optimizer=plan.optimizer.type,
                          momentum=plan.optimizer.momentum, persistent=persistent,
                          accumulation=plan.batch.gradient_accumulation_steps)
    device, host, nvme = _offload(plan, states, shape)
    activations, host["activations"] = stage_activations(plan, model, shape)
    # Stage 3 is handed the whole model, built on every rank, and shards it in `initialize`.
    whole = shape.params * BYTES[plan.precision.param_dtype] if z.stage == 3 else 0
    phases = training_phases(activations=activations, after_loss=stage_activations(plan, model, shape, loss=False)[0],
                             buffers=comm_buffers(plan, shape, model=model),
                             setup_parameters=max(0, whole - device["parameters"]))
    peak = max(phases.values(), key=lambda added: sum(added.values()))
    device["parameters"] += peak.get("parameters", 0)
    device["activations"] = peak.get("activations", 0)
    device["comm_buffers"] = peak.get("comm_buffers", 0)
    device["overhead"] = overhead
    return MemoryEstimate(device={k: device[k] for k in DEVICE_CATEGORIES}, host=host, nvme=nvme,
                          nproc_per_node=plan.world.nproc_per_node)


def estimate_memory(plan: Plan, model: ModelSpec, *, calibration: Calibration | None = None,
                    measured_overhead: int | None = None) -> MemoryEstimate:
    """Predicted bytes per rank by category for the fullest pipeline stage's rank.

    Device categories: parameters, gradients, optimizer_states, master_weights, activations,
    comm_buffers, overhead. Host (per rank): offloaded parameters, fp32 gradients, optimizer
    states, masters, checkpointed activations, swap buffers. NVMe: offloaded bytes per rank.
    `measured_overhead` is the cluster's probed start-up figure (ClusterSpec.runtime_overhead_bytes).
    """
    shapes = stage_shapes(model, tp=plan.parallel.tp, pp=plan.parallel.pp,
                          method=plan.parallel.pipeline_partition_method)
    overhead = runtime_overhead(device=plan.world.device, measured=measured_overhead)
    estimates = [_stage_estimate(plan, model, s, overhead=overhead) for s in shapes]
    worst = max(estimates, key=lambda m: (m.device_total, sum(m.host.values())))
    if calibration is None:
        return worst
    device, host = calibration.apply(worst.device, worst.host)
    note = f"calibrated from {calibration.source}" if calibration.source else "calibrated"
    return MemoryEstimate(device=device, host=host, nvme=worst.nvme, nproc_per_node=worst.nproc_per_node,
                          notes=(note,))
