"""Bucket sizes the config leaves out are derived from the rank's model and the cluster (compiler/buckets.py)."""

from __future__ import annotations

from zeroplan.compiler.buckets import BUCKETS, DEEPSPEED_DEFAULT, derived_bucket, latency_floor
from zeroplan.compiler.shards import IN_PLACE_MIN, publish_gathers
from zeroplan.schemas import ClusterSpec, ModelSpec


def test_left_out_buckets_are_an_eighth_of_the_rank_and_recorded(compile_dict):
    small = ModelSpec.load("small")
    plan = compile_dict({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}},
                        model="small", nproc_per_node=2)
    share = small.total_params // BUCKETS
    assert plan.zero.reduce_bucket_size == plan.zero.allgather_bucket_size == share
    derived = plan.provenance.derived
    assert set(derived) == {"zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size"}
    assert f"{share:,} elements" in derived["zero_optimization.reduce_bucket_size"]
    assert not any("bucket" in w for w in plan.estimates.warnings)


def test_given_buckets_are_kept_and_not_recorded(compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 2,
                         "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}, nproc_per_node=2)
    assert plan.zero.reduce_bucket_size == 500_000_000
    assert "zero_optimization.reduce_bucket_size" not in plan.provenance.derived
    assert "zero_optimization.allgather_bucket_size" in plan.provenance.derived
    assert any("reduce_bucket_size" in w and "holds the whole model" in w for w in plan.estimates.warnings)


def test_the_latency_floor_keeps_latency_a_tenth_of_the_collective(compile_dict):
    plan = compile_dict({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}, nproc_per_node=2)
    cluster = ClusterSpec.load("cpu")
    floor = latency_floor(op="reduce_scatter", dtype_bytes=4, plan=plan, cluster=cluster)
    rates = cluster.rates
    latency = rates.intra_node_latency  # one ring step over 2 ranks
    transfer = floor * 4 / 2 / rates.collective_bandwidth("reduce_scatter", inter_node=False)  # (n-1)/n of the bucket
    assert abs(latency / (latency + transfer) - 0.1) < 1e-3


def test_derived_bucket_bounds():
    assert derived_bucket(rank_params=8_000, floor=10)[0] == 1_000
    assert derived_bucket(rank_params=8_000, floor=4_000)[0] == 4_000
    size, why = derived_bucket(rank_params=8_000, floor=9_000)
    assert size == 8_000 and "one bucket" in why
    assert derived_bucket(rank_params=10 * DEEPSPEED_DEFAULT, floor=10)[0] == DEEPSPEED_DEFAULT


def test_large_rank_major_tensors_are_published_in_place_where_collectives_run_per_rank():
    """On gloo a tensor of at least IN_PLACE_MIN elements that needs no padding is gathered on
    its own, into the parameter's storage; the tensors between such ones keep one call per
    run through the bucket's buffer, as every bucket does on NCCL."""
    big, small = IN_PLACE_MIN, 6
    numels = [small, big, small, small, big, big + 1, big, small]  # big + 1 needs padding over 2 ranks
    buckets = [(0, 4), (4, 8)]

    def ranges(gathers):
        return [(g.start, g.end) for g in gathers]

    gloo = publish_gathers(numels, buckets, world=2, per_rank=True)
    assert ranges(gloo) == [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    assert [g.in_place for g in gloo] == [False, True, False, True, False, True, False]
    nccl = publish_gathers(numels, buckets, world=2, per_rank=False)
    assert ranges(nccl) == buckets and not any(g.in_place for g in nccl)
    assert ranges(publish_gathers(numels, buckets, world=1, per_rank=True)) == buckets, "one rank shards nothing"
    assert ranges(publish_gathers([big - 2, big - 2], [(0, 2)], world=2, per_rank=True)) == [(0, 2)], \
        "below IN_PLACE_MIN"
