"""Process groups for a run: torch.distributed set up from the torchrun environment.

One object, `ProcessGroups`, carries every group the runtime uses and is passed down
explicitly; nothing here is module-global. The dp, tp and pp groups follow the plan's
`layout.order` (parallel/topology.py); with tp = pp = 1 the dp group is the whole world.
Each rank checks that the ranks its launcher started on its node are the ones the plan's
`layout.nodes` puts there (a plan for 2 nodes x 4 ranks launched as 4 x 2 has the same world
size but another layout).

Set-up rules:
- torch.distributed already initialised (a test harness, a user script): use it as it is.
- torchrun's variables present (RANK, WORLD_SIZE, MASTER_ADDR, ...): `init_process_group`
  from the environment, gloo on CPU and NCCL on CUDA, as the plan says.
- neither, and the plan has one process: a one-rank group over an in-memory store, so a
  plain `python train.py` works without a launcher.

Bounded failure: a collective that a rank never joins raises on the ranks waiting in it after
`world.collective_timeout_s` (torch's own default is 30 minutes), so a stuck or dead rank ends
the job instead of hanging it. The default group zeroplan creates and every group built here
get that timeout. Joining the world itself waits at least JOIN_TIMEOUT_S: ranks start at
different times (imports, model building), and a short collective timeout must not fail
the start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.plan import LayoutPlan, ParallelPlan, WorldPlan

from .parallel import Topology, build_mesh_groups

JOIN_TIMEOUT_S = 300.0
"""Seconds the ranks have to meet in init_process_group (and in creating each group)."""


@dataclass
class ProcessGroups:
    """The groups and coordinates of this process."""

    rank: int
    world_size: int
    dp_group: dist.ProcessGroup
    """Data-parallel group: gradients are reduced and ZeRO state is sharded over it."""
    dp_rank: int
    dp_size: int
    device: torch.device
    topology: Topology
    tp_group: dist.ProcessGroup | None = None
    """Tensor-parallel group (None when tp = 1): per-layer activations are all-reduced over it."""
    pp_group: dist.ProcessGroup | None = None
    """Pipeline group (None when pp = 1): activations and their gradients pass along it."""
    owns_init: bool = False
    """True when `init_distributed` created the default group (so `close` destroys it)."""

    def close(self) -> None:
        """Destroy the default group if `init_distributed` made it, and drop our reference to it.

        The barrier lets every rank finish its last collective, so no rank tears down connections
        a peer still reads. Dropping the reference lets the group be destructed now, while the
        interpreter is alive: a gloo group destructed during interpreter shutdown can abort the
        process (pytorch/pytorch#179291).
        """
        if self.owns_init and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        self.dp_group = self.tp_group = self.pp_group = None

    @property
    def tp_rank(self) -> int:
        return self.topology.coords(self.rank)["tp"]

    @property
    def tp_size(self) -> int:
        return self.topology.tp

    @property
    def pp_rank(self) -> int:
        return self.topology.coords(self.rank)["pp"]

    @property
    def pp_size(self) -> int:
        return self.topology.pp


def init_distributed(*, world: WorldPlan, parallel: ParallelPlan, layout: LayoutPlan) -> ProcessGroups:
    """Initialise (or adopt) torch.distributed for `world`; check it matches the plan; build the
    groups of `parallel`'s degrees laid out as `layout` says."""
    device = _device(world)  # before any NCCL set-up: a cuda plan on a machine without GPUs is a user error
    timeout = timedelta(seconds=world.collective_timeout_s)
    join = timedelta(seconds=max(world.collective_timeout_s, JOIN_TIMEOUT_S))
    owns = False
    if not dist.is_initialized():
        owns = True
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=world.backend, timeout=join)
        elif world.world_size == 1:
            dist.init_process_group(backend=world.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=join)
        else:
            raise ConfigError(Problem("world.world_size", f"the plan needs {world.world_size} processes but "
                                      "no launcher environment (RANK, WORLD_SIZE) was found",
                                      suggestion=f"run under `zeroplan train` or torchrun --nproc-per-node "
                                      f"{world.nproc_per_node}"))
    backend = dist.get_backend()
    if backend != world.backend:  # e.g. a script that set up NCCL itself for a plan compiled for cpu
        raise ConfigError(Problem("world.backend", f"the plan runs collectives on {world.backend} but the process "
                                  f"group was initialised with {backend}", given=world.backend,
                                  suggestion="let zeroplan.initialize set up torch.distributed, or compile the plan "
                                  "for the device this process group uses"))
    size = dist.get_world_size()
    if size != world.world_size:
        raise ConfigError(Problem("world.world_size", f"the plan is for world_size({world.world_size}) but "
                                  f"{size} processes were launched",
                                  suggestion="launch as many processes as the plan says, or recompile it"))
    rank = dist.get_rank()
    check_node(layout, rank=rank, environ=os.environ)
    topology = Topology(dp=parallel.dp, tp=parallel.tp, pp=parallel.pp, order=layout.order)
    _set_group_default(join)  # the ranks may reach the groups' creation at different times
    groups = build_mesh_groups(topology, device=device)
    _bound_collectives([dist.group.WORLD] if owns else [], groups=groups, timeout=timeout)
    return ProcessGroups(rank=rank, world_size=size, dp_group=groups["dp"], dp_rank=topology.coords(rank)["dp"],
                         dp_size=parallel.dp, device=device, topology=topology, tp_group=groups["tp"],
                         pp_group=groups["pp"], owns_init=owns)


def check_node(layout: LayoutPlan, *, rank: int, environ) -> None:
    """ConfigError when the launcher started `rank` beside other ranks than the plan's node holds.
    A launcher's node runs global ranks RANK - LOCAL_RANK to that + LOCAL_WORLD_SIZE - 1; without
    those variables (a one-process run, a script's own group) there is nothing to compare."""
    if "LOCAL_RANK" not in environ or "LOCAL_WORLD_SIZE" not in environ:
        return
    first = rank - int(environ["LOCAL_RANK"])
    launched = (first, first + int(environ["LOCAL_WORLD_SIZE"]) - 1)
    node = next(n for n, (lo, hi) in enumerate(layout.nodes) if lo <= rank <= hi)
    if tuple(layout.nodes[node]) != launched:
        lo, hi = layout.nodes[node]
        raise ConfigError(Problem("layout.nodes", f"the plan puts rank {rank} on node {node} with ranks {lo}-{hi}, "
                                  f"but its launcher started ranks {launched[0]}-{launched[1]} on its node "
                                  f"(LOCAL_WORLD_SIZE={environ['LOCAL_WORLD_SIZE']})",
                                  suggestion=f"launch {hi - lo + 1} ranks per node, or recompile the plan for "
                                  "the nodes you have"))


def _bound_collectives(owned: list, *, groups: dict, timeout: timedelta) -> None:
    """Give `timeout` to the groups zeroplan made (the default group only when zeroplan created
    it: a script's own group keeps its setting), and make it the timeout of groups made later
    (a pipeline's tied-weight groups)."""
    from torch.distributed import distributed_c10d as c10d

    made = {id(g): g for g in groups.values() if g is not None and g is not dist.group.WORLD}
    for group in [*owned, *made.values()]:
        c10d._set_pg_timeout(timeout, group)
    _set_group_default(timeout)


def _set_group_default(timeout: timedelta) -> None:
    """The timeout torch gives a group made without one (new_group, DeviceMesh): otherwise its
    30-minute default, not the default group's."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


def check_device(world: WorldPlan) -> None:
    """ConfigError when the plan asks for more GPUs than this machine has (checked by the
    launcher before it starts the ranks, and by each rank)."""
    if world.device != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(Problem("world.device", "the plan asks for cuda but torch sees no GPU", given="cuda",
                                  suggestion="compile the plan for device cpu (--cluster cpu), or run on a GPU "
                                  "machine"))
    if count < world.nproc_per_node:
        raise ConfigError(Problem("world.nproc_per_node", f"the plan runs {world.nproc_per_node} ranks per node, one "
                                  f"GPU each, but torch sees {count} GPU(s)", given=world.nproc_per_node,
                                  suggestion=f"compile the plan with --nproc-per-node {count}"))


def _device(world: WorldPlan) -> torch.device:
    if world.device == "cpu":
        return torch.device("cpu")
    check_device(world)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)
