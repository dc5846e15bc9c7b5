"""Rank worker of test_layout_groups.py: the process groups init_distributed builds from a plan's
layout, read back from torch (the global ranks of each group), beside the plan's own groups."""

from __future__ import annotations

import torch.distributed as dist

from rt_plans import make_plan
from zeroplan.schemas import ConfigError, Plan
from zeroplan.schemas.layout import Topology
from zeroplan.schemas.plan import LayoutPlan, ParallelPlan, WorldPlan


def _plan(*, nnodes: int, dp: int, tp: int, pp: int, order: list[str]) -> Plan:
    """A stage-0 plan of these degrees on `nnodes` nodes, its ranks laid out in `order`."""
    data = make_plan(stage=0, world=dp * tp * pp).model_dump()
    world = WorldPlan(**{**data["world"], "nnodes": nnodes, "nproc_per_node": dp * tp * pp // nnodes})
    parallel = ParallelPlan(**{**data["parallel"], "dp": dp, "tp": tp, "pp": pp})
    data.update(world=world, parallel=parallel, layout=LayoutPlan.derive(world=world, parallel=parallel, order=order),
                batch={**data["batch"], "global_batch_size": data["batch"]["micro_batch_size"] * dp})
    return Plan.model_validate(data)


def layout_groups(cases: list[dict]) -> list:
    """Per case: ({dim: ranks of this rank's group as built}, {dim: the plan's group of this rank}),
    or the error of a plan whose nodes the launch contradicts."""
    from zeroplan.runtime.dist import init_distributed

    rank, out = dist.get_rank(), []
    for case in cases:
        plan = _plan(**case)
        try:
            groups = init_distributed(world=plan.world, parallel=plan.parallel, layout=plan.layout)
        except ConfigError as e:
            out.append(str(e))
            continue
        built = {"dp": groups.dp_group, "tp": groups.tp_group, "pp": groups.pp_group}
        got = {d: dist.get_process_group_ranks(g) for d, g in built.items() if g is not None}
        p = plan.parallel
        topology = Topology(dp=p.dp, tp=p.tp, pp=p.pp, order=plan.layout.order)
        out.append((got, {d: next(g for g in topology.group_ranks(d) if rank in g) for d in got}))
    return out
