"""Where a plan's groups sit on its nodes: the layout section, the layouts refused or warned
about, and the lines the report and the launch scripts show. The arithmetic is
schemas/layout.py's, the same the runtime builds its process groups with.

Why tp matters most: a tp group all-reduces activations in every block's forward and backward,
the most frequent collectives of a step, so across the inter-node link it slows every layer
(Narayanan et al. 2021, section 3.3: tensor parallelism within a node, pipeline across nodes).
"""

from __future__ import annotations

from zeroplan.schemas import Problem
from zeroplan.schemas.layout import DEFAULT_ORDER, Topology, node_of, split_groups
from zeroplan.schemas.plan import LayoutPlan, ParallelPlan, WorldPlan


def _topology(parallel: ParallelPlan, order) -> Topology:
    return Topology(dp=parallel.dp, tp=parallel.tp, pp=parallel.pp, order=order)


def _nodes_of(group: list[int], nproc_per_node: int) -> str:
    return ", ".join(str(n) for n in sorted({node_of(r, nproc_per_node=nproc_per_node) for r in group}))


def layout_plan(*, world: WorldPlan, parallel: ParallelPlan,
                order: list[str] | None) -> tuple[LayoutPlan, list[Problem]]:
    """The layout for `order` (None: the default) and why it is refused: a given order that
    splits tp groups across nodes where the default keeps every one inside a node."""
    layout = LayoutPlan.derive(world=world, parallel=parallel, order=tuple(order or DEFAULT_ORDER))
    if order is None or "tp" not in layout.crosses_nodes:
        return layout, []
    per_node = world.nproc_per_node
    if split_groups(_topology(parallel, DEFAULT_ORDER), "tp", nproc_per_node=per_node):
        return layout, []  # the degrees split tp whatever the order: a warning (layout_warnings)
    group = split_groups(_topology(parallel, layout.order), "tp", nproc_per_node=per_node)[0]
    return layout, [Problem("parallel.layout", f"{list(order)} puts tp group {group} on nodes "
                            f"{_nodes_of(group, per_node)}: its per-block all-reduces would cross the inter-node "
                            f"link, while {list(DEFAULT_ORDER)} keeps every tp({parallel.tp}) group inside one of "
                            f"the nproc_per_node({per_node}) ranks of a node", given=list(order),
                            suggestion="put tp last in parallel.layout, or leave parallel.layout out")]


def layout_warnings(*, world: WorldPlan, parallel: ParallelPlan, layout: LayoutPlan) -> list[str]:
    """tp groups split across nodes although tp fits in a node: tp does not divide nproc_per_node
    (tp > nproc_per_node is degrees.degree_warnings')."""
    per_node = world.nproc_per_node
    if "tp" not in layout.crosses_nodes or parallel.tp > per_node:
        return []
    groups = split_groups(_topology(parallel, layout.order), "tp", nproc_per_node=per_node)
    fits = [d for d in range(2, per_node + 1) if per_node % d == 0]
    return [f"tp({parallel.tp}) does not divide nproc_per_node({per_node}): {len(groups)} tp group(s), e.g. "
            f"ranks {groups[0]} on nodes {_nodes_of(groups[0], per_node)}, all-reduce across nodes in every block; "
            f"choose parallel.tp among {fits}"]


def node_lines(*, world: WorldPlan, parallel: ParallelPlan, layout: LayoutPlan) -> list[str]:
    """Per node, its ranks and the (pp, dp, tp) coordinates they hold, e.g.
    'node 1: ranks 4-7; pp 1, dp 0-1, tp 0-1'."""
    topology = _topology(parallel, layout.order)
    lines = []
    for n, (first, last) in enumerate(layout.nodes):
        coords = [topology.coords(r) for r in range(first, last + 1)]
        held = ", ".join(f"{d} {_span(sorted({c[d] for c in coords}))}" for d in ("pp", "dp", "tp"))
        lines.append(f"node {n}: ranks {first}-{last}; {held}")
    return lines


def _span(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)):
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def crossing_line(layout: LayoutPlan) -> str:
    """Which groups cross nodes, in words."""
    crossing = ", ".join(layout.crosses_nodes)
    return f"{crossing} groups cross nodes" if crossing else "every group inside one node"
