"""The dp, tp and pp process groups of a plan's rank layout.

Which rank holds which (pp, dp, tp) coordinate is the plan's `layout.order`, with its
arithmetic in `zeroplan.schemas.layout.Topology`, the one definition the compiler's cost model
and report use as well. With the default order (pp, dp, tp), Megatron-LM's, a tp group is `tp`
consecutive ranks, a dp group takes every tp-th rank within one pipeline stage, and a pp group
every (dp * tp)-th rank: with dp=2, tp=2, pp=2 over 8 ranks, tp groups [0,1] [2,3] [4,5] [6,7];
dp groups [0,2] [1,3] [4,6] [5,7]; pp groups [0,4] [1,5] [2,6] [3,7].

The groups come from torch's DeviceMesh over the degrees taken in `order`, whose row-major
numbering is exactly the layout's; one code path for gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from zeroplan.schemas.layout import Topology

__all__ = ["Topology", "build_mesh_groups"]


def build_mesh_groups(topology: Topology, *, device: torch.device) -> dict[str, dist.ProcessGroup]:
    """The dp, tp and pp groups containing this rank (a collective: every rank calls it).

    With tp = pp = 1 the dp group is the whole world and no new group is created.
    """
    if dist.get_world_size() != topology.world_size:
        raise ValueError(f"dp({topology.dp}) * tp({topology.tp}) * pp({topology.pp}) = {topology.world_size} "
                         f"!= world_size({dist.get_world_size()})")
    if topology.tp == 1 and topology.pp == 1:
        return {"dp": dist.group.WORLD, "tp": None, "pp": None}
    mesh = init_device_mesh(device.type, topology.shape, mesh_dim_names=topology.order)
    return {dim: mesh.get_group(dim) for dim in topology.order}
