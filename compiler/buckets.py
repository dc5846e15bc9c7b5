"""Bucket sizes for a config that gives none: well below the rank's model, above the latency floor.

DeepSpeed's defaults (`reduce_bucket_size` and `allgather_bucket_size`, 5e8 elements) put the
whole model of anything under 500M parameters per rank into one bucket: no gradient is reduced
until backward ends, so nothing overlaps, stage 2 keeps every gradient of the step alive beside
the [W, n] bucket, and each collective's buffers are model-sized. Where the config leaves a
size out, compile derives it instead:

- at most 1/BUCKETS of the rank's parameters, so backward launches BUCKETS reductions as it
  goes (what `overlap_comm` can hide, and what lets stage 2 free gradients early), and never
  above DeepSpeed's default;
- at least the latency floor: the size whose ring latency is LATENCY_SHARE of the collective's
  time at the cluster's rate for it (intra- or inter-node, as the cost model charges), so that
  splitting does not make the step latency-bound;
- the rank's whole model where the floor exceeds it.

A value the config gives is kept (plan_builder.bucket_warnings says when it defeats the stage),
and every derived value is recorded with its reason in the plan's `provenance.derived`.
"""

from __future__ import annotations

from zeroplan.schemas import ClusterSpec, Plan

from .comm import Collective, ring_bytes
from .cost import collective_time
from .memory import BYTES

BUCKETS = 8
"""Reductions backward launches per step when the bucket is derived from the model."""

LATENCY_SHARE = 0.1
"""Largest share of a derived bucket's collective time that is ring latency."""

DEEPSPEED_DEFAULT = 500_000_000
"""DeepSpeed's reduce_bucket_size and allgather_bucket_size: the ceiling of a derived bucket."""

KEYS = {"reduce_bucket_size": "zero_optimization.reduce_bucket_size",
        "allgather_bucket_size": "zero_optimization.allgather_bucket_size"}
"""ZeroPlan field -> the config key that gives it."""


def latency_floor(*, op: str, dtype_bytes: int, plan: Plan, cluster: ClusterSpec) -> int:
    """Elements of the smallest `op` bucket over dp whose latency is at most LATENCY_SHARE of its time."""
    n = plan.parallel.dp
    if n == 1:
        return 1
    probe = 1 << 30  # bytes of a bucket large enough to read the bandwidth term off

    def seconds(size_bytes: int) -> float:
        return collective_time(Collective("dp", op, "backward", n, ring_bytes(op, size_bytes, n), 1),
                               plan=plan, cluster=cluster)

    latency = seconds(0)
    per_byte = (seconds(probe) - latency) / probe
    if per_byte <= 0:
        return 1
    # latency <= share * (latency + bytes * per_byte)
    floor_bytes = latency * (1 - LATENCY_SHARE) / (LATENCY_SHARE * per_byte)
    return max(1, -(-int(floor_bytes) // dtype_bytes))


def derived_bucket(*, rank_params: int, floor: int) -> tuple[int, str]:
    """The bucket for a rank of `rank_params` parameters given the latency floor, and why."""
    share = max(rank_params // BUCKETS, 1)
    if floor >= rank_params:
        return max(rank_params, 1), (f"the rank's {rank_params:,} parameters in one bucket: the latency floor "
                                     f"({floor:,} elements) is above them")
    if share >= floor:
        if share > DEEPSPEED_DEFAULT:
            return DEEPSPEED_DEFAULT, f"DeepSpeed's default, below 1/{BUCKETS} of the rank's {rank_params:,} parameters"
        return share, f"1/{BUCKETS} of the rank's {rank_params:,} parameters, above the latency floor of {floor:,} elements"
    return floor, (f"the latency floor ({floor:,} elements: ring latency at most {LATENCY_SHARE:.0%} of the "
                   f"collective), above 1/{BUCKETS} of the rank's {rank_params:,} parameters")


def derive_buckets(plan: Plan, *, given: set[str], rank_params: int, cluster: ClusterSpec) -> Plan:
    """`plan` with the bucket sizes the config did not give (`given`: ZeroPlan field names it
    set) derived from the rank's parameters and the cluster, each recorded with its reason."""
    z = plan.zero
    grad_op = "reduce_scatter" if z.stage == 3 or (z.stage > 0 and z.reduce_scatter) else "all_reduce"
    ops = {"reduce_bucket_size": (grad_op, BYTES[plan.precision.reduce_dtype]),
           "allgather_bucket_size": ("all_gather", BYTES[plan.precision.param_dtype])}
    update, reasons = {}, {}
    for field, (op, dtype_bytes) in ops.items():
        if field in given:
            continue
        floor = latency_floor(op=op, dtype_bytes=dtype_bytes, plan=plan, cluster=cluster)
        update[field], why = derived_bucket(rank_params=rank_params, floor=floor)
        reasons[KEYS[field]] = f"not given: {update[field]:,} elements, {why} (DeepSpeed's default is 5e8)"
    if not update:
        return plan
    provenance = plan.provenance.model_copy(update={"derived": {**plan.provenance.derived, **reasons}})
    return plan.model_copy(update={"zero": z.model_copy(update=update), "provenance": provenance})
