"""The rank layout: which global rank holds which (pp, dp, tp) coordinate, and which ranks share
a node. One torch-free definition that the compiler (plan, cost model, warnings, report) and
the runtime (process groups, pipeline peers, checkpoints) all use.

Ranks are numbered row-major over the degrees taken in `order`, slowest-varying first. The
default, ("pp", "dp", "tp"), is Megatron-LM's (Narayanan et al. 2021, section 3.3):

    rank = pp_index * (dp * tp) + dp_index * tp + tp_index

so a tp group is `tp` consecutive ranks and stays inside a node whenever tp divides
nproc_per_node (its per-layer all-reduces, the most frequent collectives, then use the fast
intra-node link), while pipeline stages, whose point-to-point sends are the lightest traffic,
are the first to sit on separate nodes.

Nodes: a launcher (torchrun, one per node) gives node n the ranks n * nproc_per_node to
(n + 1) * nproc_per_node - 1, so which ranks share a node follows from nproc_per_node alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Dim = Literal["pp", "dp", "tp"]
DIMS: tuple[Dim, Dim, Dim] = ("pp", "dp", "tp")
DEFAULT_ORDER: tuple[Dim, Dim, Dim] = ("pp", "dp", "tp")
"""Megatron's layout, slowest-varying first: tp innermost, pp outermost."""


def order_problem(order: tuple[str, ...]) -> str | None:
    """Why `order` is not a layout (None when it is one): each of pp, dp, tp exactly once."""
    if sorted(order) != sorted(DIMS):
        return f"{list(order)} is not an order of {list(DIMS)}: name each of pp, dp and tp once, slowest first"
    return None


@dataclass(frozen=True)
class Topology:
    """Degrees of a run and the arithmetic of its rank layout."""

    dp: int
    tp: int
    pp: int
    order: tuple[str, str, str] = DEFAULT_ORDER
    """The dimensions slowest-varying first; ranks are numbered row-major over them."""

    def __post_init__(self):
        problem = order_problem(tuple(self.order))
        if problem:
            raise ValueError(problem)
        object.__setattr__(self, "order", tuple(self.order))

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def sizes(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp}

    @property
    def shape(self) -> tuple[int, int, int]:
        """Degrees in `order`: the shape of the row-major rank grid (a DeviceMesh's shape)."""
        return tuple(self.sizes[d] for d in self.order)

    def _strides(self) -> dict[str, int]:
        strides, step = {}, 1
        for dim in reversed(self.order):
            strides[dim] = step
            step *= self.sizes[dim]
        return strides

    def coords(self, rank: int) -> dict[str, int]:
        """{'pp': ..., 'dp': ..., 'tp': ...} indices of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        strides = self._strides()
        return {d: rank // strides[d] % self.sizes[d] for d in DIMS}

    def rank_of(self, *, pp: int, dp: int, tp: int) -> int:
        strides = self._strides()
        return pp * strides["pp"] + dp * strides["dp"] + tp * strides["tp"]

    def group_ranks(self, dim: str) -> list[list[int]]:
        """Every group along `dim` ('dp', 'tp' or 'pp'), each as its global ranks in order,
        the groups ordered by the other two coordinates in `order`."""
        if dim not in DIMS:
            raise ValueError(f"dimension {dim!r} is none of {DIMS}")
        outer, inner = (d for d in self.order if d != dim)
        return [[self.rank_of(**{outer: a, inner: b, dim: i}) for i in range(self.sizes[dim])]
                for a in range(self.sizes[outer]) for b in range(self.sizes[inner])]


def node_of(rank: int, *, nproc_per_node: int) -> int:
    """The node a launcher starts `rank` on."""
    return rank // nproc_per_node


def node_ranks(*, nnodes: int, nproc_per_node: int) -> tuple[tuple[int, int], ...]:
    """Per node, its first and last global rank."""
    return tuple((n * nproc_per_node, (n + 1) * nproc_per_node - 1) for n in range(nnodes))


def split_groups(topology: Topology, dim: str, *, nproc_per_node: int) -> list[list[int]]:
    """The groups along `dim` whose ranks are on more than one node."""
    return [g for g in topology.group_ranks(dim) if len({node_of(r, nproc_per_node=nproc_per_node) for r in g}) > 1]


@lru_cache(maxsize=256)
def crossing_dims(topology: Topology, *, nproc_per_node: int) -> tuple[str, ...]:
    """The dimensions (in DIMS order) with at least one group spanning nodes: their collectives
    run at inter-node rates."""
    return tuple(d for d in DIMS if split_groups(topology, d, nproc_per_node=nproc_per_node))
