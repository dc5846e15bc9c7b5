"""The runtime's process groups are the plan's: four gloo ranks build their dp, tp and pp groups
from plans of several layout orders, and each group's global ranks, read back from torch, are
the group schemas/layout.py gives that rank (the arithmetic the compiler's cost model and report
use). A plan for 2 nodes x 2 ranks started as one node of 4 is refused on every rank, naming
layout.nodes."""

from __future__ import annotations

from rt_harness import run_distributed
from rt_layout import layout_groups

CASES = [dict(nnodes=1, dp=2, tp=2, pp=1, order=["pp", "dp", "tp"]),
         dict(nnodes=1, dp=2, tp=2, pp=1, order=["tp", "pp", "dp"]),
         dict(nnodes=1, dp=1, tp=2, pp=2, order=["pp", "dp", "tp"]),
         dict(nnodes=1, dp=1, tp=2, pp=2, order=["tp", "dp", "pp"]),
         dict(nnodes=2, dp=2, tp=1, pp=2, order=["pp", "dp", "tp"])]


def test_the_groups_built_are_the_plans_and_a_launch_against_its_nodes_is_refused():
    per_rank = run_distributed(layout_groups, 4, CASES, timeout=240)
    for rank, results in enumerate(per_rank):
        *built, refused = results
        for case, (got, planned) in zip(CASES, built):
            assert got == planned and set(got) == {"dp", "tp", "pp"}, (rank, case)
        assert f"layout.nodes: the plan puts rank {rank} on node {rank // 2} with ranks" in refused
        assert "its launcher started ranks 0-3 on its node (LOCAL_WORLD_SIZE=4)" in refused
    # the non-default orders did change the groups (the check above compares something)
    assert per_rank[1][0][0]["tp"] == [0, 1] and per_rank[1][1][0]["tp"] == [1, 3]
