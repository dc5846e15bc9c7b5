"""The rank layout (schemas/layout.py): coordinates, groups, nodes and which groups cross nodes,
over several (nnodes, nproc_per_node, dp, tp, pp) shapes, and the plan's layout section."""

from __future__ import annotations

import itertools

import pytest

from zeroplan.schemas import Plan
from zeroplan.schemas.layout import DEFAULT_ORDER, Topology, crossing_dims, node_ranks, split_groups
from zeroplan.schemas.plan import LayoutPlan

SHAPES = [(1, 8, 2, 2, 2), (2, 4, 2, 2, 2), (2, 4, 1, 4, 2), (4, 2, 2, 2, 2), (2, 6, 3, 4, 1), (2, 6, 1, 4, 3),
          (3, 4, 2, 2, 3), (2, 2, 1, 4, 1), (8, 1, 2, 2, 2)]
"""(nnodes, nproc_per_node, dp, tp, pp)."""
ORDERS = list(itertools.permutations(("pp", "dp", "tp")))


@pytest.mark.parametrize("nnodes, nproc, dp, tp, pp", SHAPES)
def test_default_layout_is_megatrons(nnodes, nproc, dp, tp, pp):
    topo = Topology(dp=dp, tp=tp, pp=pp)
    for rank in range(topo.world_size):
        c = topo.coords(rank)
        assert rank == c["pp"] * dp * tp + c["dp"] * tp + c["tp"] == topo.rank_of(**c)
    assert topo.group_ranks("tp") == [list(range(s, s + tp)) for s in range(0, topo.world_size, tp)]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("nnodes, nproc, dp, tp, pp", SHAPES)
def test_groups_partition_the_world_and_vary_one_coordinate(order, nnodes, nproc, dp, tp, pp):
    topo = Topology(dp=dp, tp=tp, pp=pp, order=order)
    every = sorted((c["pp"], c["dp"], c["tp"]) for c in map(topo.coords, range(topo.world_size)))
    assert every == list(itertools.product(range(pp), range(dp), range(tp)))  # each coordinate once
    for dim in ("pp", "dp", "tp"):
        groups = topo.group_ranks(dim)
        assert sorted(r for g in groups for r in g) == list(range(topo.world_size))
        for g in groups:
            assert len(g) == topo.sizes[dim]
            coords = [topo.coords(r) for r in g]
            assert [c[dim] for c in coords] == list(range(topo.sizes[dim]))
            assert all({k: v for k, v in c.items() if k != dim} == {k: v for k, v in coords[0].items() if k != dim}
                       for c in coords)
    fastest = order[-1]  # the innermost dimension's groups are consecutive ranks
    assert all(g == list(range(g[0], g[0] + len(g))) for g in topo.group_ranks(fastest))


@pytest.mark.parametrize("nnodes, nproc, dp, tp, pp", SHAPES)
def test_crossing_dims_are_the_groups_with_ranks_on_two_nodes(nnodes, nproc, dp, tp, pp):
    topo = Topology(dp=dp, tp=tp, pp=pp)
    nodes = node_ranks(nnodes=nnodes, nproc_per_node=nproc)
    assert nodes[0][0] == 0 and nodes[-1][1] == topo.world_size - 1
    node = {r: n for n, (lo, hi) in enumerate(nodes) for r in range(lo, hi + 1)}
    expected = tuple(d for d in ("pp", "dp", "tp") if any(len({node[r] for r in g}) > 1 for g in topo.group_ranks(d)))
    assert crossing_dims(topo, nproc_per_node=nproc) == expected
    if nnodes == 1:
        assert expected == ()


def test_which_groups_cross_for_known_shapes():
    # 2 nodes x 4: the pipeline stages sit on separate nodes, tp and dp stay inside one
    assert crossing_dims(Topology(dp=2, tp=2, pp=2), nproc_per_node=4) == ("pp",)
    # tp(4) does not divide 6 ranks per node: the group [4, 5, 6, 7] straddles nodes 0 and 1
    assert split_groups(Topology(dp=3, tp=4, pp=1), "tp", nproc_per_node=6) == [[4, 5, 6, 7]]
    # pp innermost keeps the stages together and sends dp across
    assert crossing_dims(Topology(dp=2, tp=1, pp=4, order=("dp", "tp", "pp")), nproc_per_node=4) == ("dp",)
    assert crossing_dims(Topology(dp=2, tp=2, pp=2, order=("tp", "dp", "pp")), nproc_per_node=4) == ("tp",)


def test_a_bad_order_is_refused():
    with pytest.raises(ValueError, match=r"\['pp', 'pp', 'tp'\] is not an order of"):
        Topology(dp=1, tp=1, pp=1, order=("pp", "pp", "tp"))


def _plan(**layout) -> Plan:
    return Plan.model_validate({
        "world": {"nnodes": 2, "nproc_per_node": 4, "world_size": 8},
        "parallel": {"dp": 2, "tp": 2, "pp": 2, "pipeline_micro_batches": 2},
        "batch": {"global_batch_size": 4, "micro_batch_size": 1, "gradient_accumulation_steps": 2},
        "zero": {"stage": 1, "reduce_bucket_size": 1, "allgather_bucket_size": 1, "overlap_comm": False,
                 "prefetch_bucket_size": 0, "param_persistence_threshold": 0, "model_persistence_threshold": 0,
                 "max_live_parameters": 0, "max_reuse_distance": 0, "sub_group_size": 1}, **layout})


def test_a_plan_without_a_layout_gets_the_default_one_and_round_trips():
    plan = _plan()
    assert plan.layout == LayoutPlan(order=DEFAULT_ORDER, nodes=((0, 3), (4, 7)), crosses_nodes=("pp",))
    assert Plan.model_validate_json(plan.to_json()) == plan


def test_a_layout_that_does_not_follow_from_the_world_is_refused():
    with pytest.raises(ValueError, match=r"does not follow from nnodes\(2\), nproc_per_node\(4\).*recompile"):
        _plan(layout={"order": ["pp", "dp", "tp"], "nodes": [[0, 7]], "crosses_nodes": []})
    with pytest.raises(ValueError, match="expected .*'crosses_nodes': \\('dp',\\)"):
        _plan(layout={"order": ["dp", "pp", "tp"], "nodes": [[0, 3], [4, 7]], "crosses_nodes": ["pp"]})
