"""The dp x tp x pp rank layout and its process groups.

Layout (Megatron-LM's): tp varies fastest, then dp, then pp,

    rank = pp_index * (dp * tp) + dp_index * tp + tp_index

so a tp group is `tp` consecutive ranks (on one node whenever tp divides nproc_per_node:
its per-layer all-reduces stay on the fast intra-node link), a dp group takes every tp-th
rank within one pipeline stage, and a pp group takes every (dp * tp)-th rank. With
dp=2, tp=2, pp=2 over 8 ranks: tp groups [0,1] [2,3] [4,5] [6,7]; dp groups [0,2] [1,3]
[4,6] [5,7]; pp groups [0,4] [1,5] [2,6] [3,7].

The groups come from torch's DeviceMesh over the (pp, dp, tp) shape, whose row-major
order is exactly this layout; one code path for gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

MESH_DIMS = ("pp", "dp", "tp")
"""Mesh dimension names, slowest-varying first."""


@dataclass(frozen=True)
class Topology:
    """Degrees of a run and the arithmetic of its rank layout."""

    dp: int
    tp: int
    pp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> dict[str, int]:
        """{'pp': ..., 'dp': ..., 'tp': ...} indices of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return {"pp": rank // (self.dp * self.tp), "dp": rank // self.tp % self.dp, "tp": rank % self.tp}

    def rank_of(self, *, pp: int, dp: int, tp: int) -> int:
        return pp * self.dp * self.tp + dp * self.tp + tp

    def group_ranks(self, dim: str) -> list[list[int]]:
        """Every group along `dim` ('dp', 'tp' or 'pp'), each as its global ranks in order."""
        sizes = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        if dim not in sizes:
            raise ValueError(f"dimension {dim!r} is none of {MESH_DIMS}")
        others = [d for d in MESH_DIMS if d != dim]
        groups = []
        for a in range(sizes[others[0]]):
            for b in range(sizes[others[1]]):
                fixed = {others[0]: a, others[1]: b}
                groups.append([self.rank_of(**fixed, **{dim: i}) for i in range(sizes[dim])])
        return groups


def build_mesh_groups(topology: Topology, *, device: torch.device) -> dict[str, dist.ProcessGroup]:
    """The dp, tp and pp groups containing this rank (a collective: every rank calls it).

    With tp = pp = 1 the dp group is the whole world and no new group is created.
    """
    if dist.get_world_size() != topology.world_size:
        raise ValueError(f"dp({topology.dp}) * tp({topology.tp}) * pp({topology.pp}) = {topology.world_size} "
                         f"!= world_size({dist.get_world_size()})")
    if topology.tp == 1 and topology.pp == 1:
        return {"dp": dist.group.WORLD, "tp": None, "pp": None}
    mesh = init_device_mesh(device.type, (topology.pp, topology.dp, topology.tp), mesh_dim_names=MESH_DIMS)
    return {dim: mesh.get_group(dim) for dim in MESH_DIMS}
