"""A concrete config -> a Plan with its estimates; every problem reported at once.

`build_plan` expects no "auto" left (autoresolve.py removes them); `attach_estimates` runs
the memory, communication and cost models on the result and records what looks wrong.
"""

from __future__ import annotations

from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec, Plan, Problem, TrainConfig, resolve_batch
from zeroplan.schemas.plan import Estimates, ParallelPlan, Provenance
from zeroplan.schemas.cluster import GiB

from .buckets import derive_buckets
from .calibration import Calibration
from .comm import comm_volume, summarize
from .cost import step_time
from .degrees import degree_problems, degree_warnings, resolve_degrees
from .memory import MemoryEstimate, estimate_memory
from .placement import layout_plan, layout_warnings
from .shapes import partition_notes, stage_shapes
from .sections import (
    checkpointing_plan,
    deepspeed_plan,
    kernels_plan,
    largest_partition,
    logging_plan,
    monitors_plan,
    offload_plan,
    optimizer_plan,
    optimizer_problems,
    precision_plan,
    scheduler_plan,
    world_plan,
    zero_plan,
)



def _parallel_plan(config: TrainConfig, *, model: ModelSpec, dp: int, tp: int, pp: int,
                   accum: int) -> tuple[ParallelPlan, list[Problem]]:
    pipe = config.parallel.pipeline
    micro_batches = pipe.micro_batches if pipe.micro_batches is not None else accum
    problems = []
    if pp > 1 and micro_batches != accum:
        problems.append(Problem("parallel.pipeline.micro_batches",
                                f"micro_batches({micro_batches}) != gradient_accumulation_steps({accum}): a pipeline "
                                "step runs every accumulated micro-batch through the stages",
                                given=micro_batches,
                                suggestion="remove parallel.pipeline.micro_batches or make them equal"))
    problems += interleaved_problems(schedule=pipe.schedule, chunks=pipe.virtual_stages, pp=pp,
                                     micro_batches=micro_batches, layers=model.layers)
    sequence_parallel = config.parallel.sequence_parallel
    if sequence_parallel and tp > 1:
        problems += sequence_parallel_problems(model, tp=tp, pp=pp)
    plan = ParallelPlan(dp=dp, tp=tp, pp=pp, pipeline_schedule=pipe.schedule, pipeline_virtual_stages=pipe.virtual_stages,
                        pipeline_micro_batches=micro_batches if pp > 1 else 1,
                        pipeline_partition_method=pipe.partition_method, sequence_parallel=sequence_parallel)
    return plan, problems


def interleaved_problems(*, schedule: str, chunks: int, pp: int, micro_batches: int, layers: int) -> list[Problem]:
    """Why the interleaved schedule cannot run this pipeline (Megatron-LM's own checks): v >= 2
    chunks per stage with it and 1 without, a pipeline to interleave, micro-batches a multiple of
    pp (runtime/parallel/pipeline_schedules.py orders them in groups of pp), and the layers split evenly
    into pp * v chunks."""
    key = "parallel.pipeline.virtual_stages"
    if schedule != "interleaved":
        return [] if chunks == 1 else [Problem(key, f"virtual_stages({chunks}) > 1 needs schedule 'interleaved', "
                                               f"the schedule is {schedule!r}", given=chunks,
                                               suggestion="set parallel.pipeline.schedule 'interleaved' or remove "
                                               "virtual_stages")]
    if chunks < 2:
        return [Problem(key, "the interleaved schedule runs at least 2 model chunks per stage", given=chunks,
                        suggestion="set parallel.pipeline.virtual_stages to 2 or more")]
    if pp == 1:
        return [Problem("parallel.pipeline.schedule", "'interleaved' needs a pipeline: pp is 1", given=schedule,
                        suggestion="set parallel.pp > 1 or schedule '1f1b'")]
    problems = []
    if micro_batches % pp:
        problems.append(Problem("gradient_accumulation_steps", f"the interleaved schedule runs micro-batches in "
                                f"groups of pp: {micro_batches} micro-batches is not a multiple of pp({pp})",
                                given=micro_batches, suggestion=f"make gradient_accumulation_steps a multiple of {pp}"))
    if layers % (pp * chunks):
        problems.append(Problem(key, f"layers({layers}) do not split into pp({pp}) * virtual_stages({chunks}) = "
                                f"{pp * chunks} equal chunks", given=chunks,
                                suggestion=f"choose virtual_stages so that pp * virtual_stages divides {layers}"))
    return problems


def sequence_parallel_problems(model: ModelSpec, *, tp: int, pp: int) -> list[Problem]:
    """Why sequence parallelism cannot split this model over tp ranks: each holds seq_len / tp
    positions, only the built-in GPT's layers implement it (runtime/parallel/sequence.py), and
    pipeline stages exchange whole activations."""
    problems = []
    if pp > 1:
        problems.append(Problem("parallel.sequence_parallel", f"sequence parallelism with pp({pp}) > 1 is not "
                                "supported: pipeline stages send and receive whole-sequence activations",
                                given=True, suggestion="set parallel.sequence_parallel false, or parallel.pp 1"))
    if model.seq_len % tp:
        problems.append(Problem("parallel.sequence_parallel", f"seq_len({model.seq_len}) of model {model.name} is "
                                f"not divisible by tp({tp}): each tp rank holds seq_len / tp positions", given=True,
                                suggestion=f"change parallel.tp to a divisor of {model.seq_len}, or set "
                                "parallel.sequence_parallel false"))
    if model.architecture != "gpt":
        problems.append(Problem("parallel.sequence_parallel", f"model {model.name} is a {model.architecture}; "
                                "sequence parallelism is implemented for the built-in GPT's layers only", given=True,
                                suggestion="set parallel.sequence_parallel false"))
    return problems


def build_plan(config: TrainConfig, model: ModelSpec, cluster: ClusterSpec, *, provenance: Provenance) -> Plan:
    """The Plan for a config with nothing "auto", without estimates; ConfigError lists every problem."""
    dp, tp, pp = resolve_degrees(config, nnodes=cluster.nnodes, nproc_per_node=cluster.nproc_per_node)
    tp_key = "parallel.tp" if config.parallel.tp is not None or config.tp is None else "tensor_parallel.autotp_size"
    stage = config.zero_optimization.stage
    problems = degree_problems(dp=dp, tp=tp, pp=pp, stage=stage, model=model, tp_key=tp_key)
    problems += optimizer_problems(config, tp=tp)
    try:
        batch = resolve_batch(config.train_batch_size, config.train_micro_batch_size_per_gpu,
                              config.gradient_accumulation_steps, dp=dp)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from e
    parallel, pipe_problems = _parallel_plan(config, model=model, dp=dp, tp=tp, pp=pp,
                                               accum=batch.gradient_accumulation_steps)
    world = world_plan(config, cluster)
    layout, layout_problems = layout_plan(world=world, parallel=parallel, order=config.parallel.layout)
    if problems + pipe_problems + layout_problems:
        raise ConfigError(problems + pipe_problems + layout_problems)
    plan = Plan(
        world=world, parallel=parallel, layout=layout, batch=batch,
        zero=zero_plan(config, largest=largest_partition(model, dp=dp, tp=tp, pp=pp,
                                                         method=parallel.pipeline_partition_method)),
        offload=offload_plan(config), precision=precision_plan(config), optimizer=optimizer_plan(config),
        scheduler=scheduler_plan(config), kernels=kernels_plan(config, cluster),
        activation_checkpointing=checkpointing_plan(config), logging=logging_plan(config),
        monitors=monitors_plan(config, cluster), deepspeed=deepspeed_plan(config), provenance=provenance)
    shapes = stage_shapes(model, tp=tp, pp=pp, method=parallel.pipeline_partition_method)
    return derive_buckets(plan, given=config.zero_optimization.model_fields_set, cluster=cluster,
                          rank_params=max(shape.params for shape in shapes))


def fit_warnings(memory: MemoryEstimate, *, cluster: ClusterSpec) -> list[str]:
    """Where the predicted memory exceeds what the cluster has."""
    notes = []
    limit = cluster.memory_per_rank()
    if memory.device_total > limit:
        notes.append(f"does not fit: {memory.device_total / GiB:.2f} GiB predicted per rank > {limit / GiB:.2f} GiB "
                     f"available; raise zero_optimization.stage, offload, enable activation_checkpointing or "
                     f"lower train_micro_batch_size_per_gpu")
    shared = memory.device_total * cluster.nproc_per_node if cluster.device == "cpu" else 0  # cpu ranks use host memory
    host_needed = memory.host_per_node + shared
    if memory.host_per_node and host_needed > cluster.host_memory_bytes:
        notes.append(f"host memory does not fit: {host_needed / GiB:.2f} GiB predicted per node > "
                     f"{cluster.host_memory_bytes / GiB:.2f} GiB; offload to nvme or use more nodes")
    if memory.nvme_per_node and cluster.nvme_free_bytes and memory.nvme_per_node > cluster.nvme_free_bytes:
        notes.append(f"NVMe does not fit: {memory.nvme_per_node / GiB:.2f} GiB predicted per node > "
                     f"{cluster.nvme_free_bytes / GiB:.2f} GiB free")
    return notes


def bucket_warnings(plan: Plan, model: ModelSpec) -> list[str]:
    """Bucket sizes that defeat the stage: one gradient bucket larger than the rank's whole
    model means nothing is reduced (or freed, at stages 2-3) until backward ends."""
    rank_params = model.total_params // (plan.parallel.tp * plan.parallel.pp)
    if plan.zero.stage < 2 or plan.zero.reduce_bucket_size < rank_params:
        return []
    return [f"zero_optimization.reduce_bucket_size ({plan.zero.reduce_bucket_size:,} elements) holds the whole "
            f"model ({rank_params:,} parameters per rank): every full gradient is kept until backward ends, so "
            f"stage {plan.zero.stage} saves no gradient memory and nothing overlaps; use a bucket well below "
            f"the model size (e.g. {max(rank_params // 20, 1):,}), or 'auto'"]


def swap_warnings(plan: Plan, model: ModelSpec) -> list[str]:
    """NVMe optimizer offload whose swap tile holds the rank's whole shard: the tile buffer
    keeps in memory everything the files were meant to hold, so nothing is saved."""
    opt = plan.offload.optimizer
    if opt.device != "nvme":
        return []
    shard = model.total_params // (plan.parallel.tp * plan.parallel.pp) // plan.parallel.dp
    tile = min(plan.zero.sub_group_size, opt.buffer_size)
    if tile < shard:
        return []
    return [f"zero_optimization.sub_group_size ({plan.zero.sub_group_size:,}) and offload_optimizer.buffer_size "
            f"({opt.buffer_size:,}) make one swap tile of the whole optimizer shard ({shard:,} elements per "
            f"rank): its buffers hold in memory what nvme offload keeps on disk, so memory does not fall; "
            f"set zero_optimization.sub_group_size well below the shard (e.g. {max(shard // 10, 1):,})"]


def attach_estimates(plan: Plan, model: ModelSpec, cluster: ClusterSpec, *,
                     calibration: Calibration | None = None) -> Plan:
    """A copy of `plan` with memory, communication and step-time predictions and warnings."""
    memory = estimate_memory(plan, model, calibration=calibration,
                             measured_overhead=cluster.runtime_overhead_bytes)
    sent, calls = summarize(comm_volume(plan, model))
    breakdown = step_time(plan, model, cluster)
    p = plan.parallel
    warnings = degree_warnings(dp=p.dp, tp=p.tp, pp=p.pp, stage=plan.zero.stage, nproc_per_node=cluster.nproc_per_node,
                               micro_batches=p.pipeline_micro_batches)
    warnings += fit_warnings(memory, cluster=cluster) + bucket_warnings(plan, model) + swap_warnings(plan, model)
    warnings += partition_notes(p.pipeline_partition_method, pp=p.pp)
    warnings += layout_warnings(world=plan.world, parallel=p, layout=plan.layout)
    estimates = Estimates(
        memory_per_rank=memory.device, host_bytes_per_node=memory.host_per_node,
        nvme_bytes_per_node=memory.nvme_per_node, host_memory_per_rank=memory.host,
        comm_bytes_per_step=sent, comm_messages_per_step=calls,
        predicted_step_time_s=sum(breakdown.values()), step_time_breakdown_s=breakdown,
        memory_limit_per_rank=cluster.memory_per_rank(), host_memory_per_node=cluster.host_memory_bytes,
        warnings=tuple(warnings))
    return plan.model_copy(update={"estimates": estimates})
