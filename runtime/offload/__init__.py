"""Offload: where a rank's fp32 master, optimizer state and ZeRO-3 partition live.

`Offload` reads the plan's `offload` slice and hands the ZeRO builder its two placement
factories (`place_master`, `param_store`), then builds the `MasterOptimizer` the Engine steps
through. Targets (ZeRO-Offload, arXiv:2101.06840; ZeRO-Infinity, arXiv:2104.07857):

  optimizer none  master and state on the compute device (ShardMaster over the stage's master)
            cpu   master and state in host memory, the step on the host (ShardMaster, host copy)
            nvme  master and state in swap files, stepped tile by tile (NvmeMaster)
  param     cpu   stage-3 partition in host memory (HostParams)
            nvme  stage-3 partition in a swap file, read ahead of its gather (NvmeParams)

Swap paths are checked before anything is built (`preflight`), and every swap file lives in a
per-run directory that is removed when the engine closes or the process exits.
"""

from __future__ import annotations

import torch

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.plan import KernelsPlan, OffloadPlan, OptimizerPlan, ZeroPlan

from ..optim import build_optimizer
from ..optim_lamb import ShardSegments
from ..zero import ZeroStage
from ..zero.layout import ShardLayout
from ..zero.param_store import ParamStore
from .master import MasterOptimizer, ShardMaster
from .nvme import NvmeMaster, SwapState, tile_elements, write_initial_master
from .params import HostParams, NvmeParams
from .preflight import SwapNeed, check_swap_paths
from .swap import SwapDir

__all__ = ["MasterOptimizer", "Offload"]

HOST = torch.device("cpu")
OPT_KEY = "zero_optimization.offload_optimizer"
PARAM_KEY = "zero_optimization.offload_param"


class Offload:
    """One rank's placement decisions; `__init__` validates and stores, builds nothing."""

    def __init__(self, *, offload: OffloadPlan, zero: ZeroPlan, optimizer: OptimizerPlan, kernels: KernelsPlan,
                 cuda: bool):
        self.opt, self.param = offload.optimizer, offload.param
        self.target = self.opt.device
        self.param_target = self.param.device if zero.stage == 3 else "none"
        self.sub_group_size = zero.sub_group_size
        self.optimizer_plan, self.kernels, self.cuda = optimizer, kernels, cuda
        """`cuda`: the compute device is a GPU, so host memory is separate (and may be pinned)."""
        _validate(self.target, self.opt.ratio, kernels, stage=zero.stage)
        self.state_names = build_optimizer(optimizer=optimizer, kernels=kernels, numel=0, device=HOST).state_names
        self._host_master: torch.Tensor | None = None
        self._swap: SwapState | None = None
        self._tile = 0

    def _pin(self, pin_memory: bool) -> bool:
        return pin_memory and self.cuda

    # -- before building: pre-flight ------------------------------------------------------------
    def preflight(self, *, numel: int, param_itemsize: int, ranks_per_node: int) -> None:
        """Check the swap paths for a shard of `numel` elements (ConfigError if unusable)."""
        needs = []
        if self.target == "nvme":
            needs.append(SwapNeed(f"{OPT_KEY}.nvme_path", self.opt.nvme_path,
                                  (numel * 4,) * (1 + len(self.state_names))))
        if self.param_target == "nvme":
            needs.append(SwapNeed(f"{PARAM_KEY}.nvme_path", self.param.nvme_path, (numel * param_itemsize,)))
        if needs:
            check_swap_paths(needs, ranks_per_node=ranks_per_node)

    # -- factories for build_zero -------------------------------------------------------------
    def place_master(self, layout: ShardLayout, rank: int) -> torch.Tensor | None:
        """This rank's initial fp32 master where the plan keeps it; the device master or None."""
        if self.target == "nvme":
            self._tile = tile_elements(sub_group_size=self.sub_group_size, buffer_size=self.opt.buffer_size,
                                       numel=layout.numel)
            folder = SwapDir(root=self.opt.nvme_path, label="optimizer")
            self._swap = SwapState(folder=folder, rank=rank, numel=layout.numel, names=self.state_names)
            write_initial_master(state=self._swap, tile=self._tile,
                                 master_range=lambda lo, hi: layout.read_params(lo, hi, rank, dtype=torch.float32))
            return None
        master = layout.read_params(0, layout.numel, rank, dtype=torch.float32)
        if self.target == "none" or not self.cuda:
            return master  # on the device; with cpu offload on a CPU-only machine the host is the device
        self._host_master = master.cpu().pin_memory() if self._pin(self.opt.pin_memory) else master.cpu()
        return None

    def param_store(self, layout: ShardLayout, rank: int, dtype: torch.dtype,
                    master: torch.Tensor | None) -> ParamStore | None:
        """The stage-3 partition's store for offload_param cpu/nvme; None keeps it on the device."""
        device = layout.params[0].device
        if self.param_target == "cpu":
            if master is not None and master.device == HOST and dtype == torch.float32:
                return HostParams(host=master, device=device)  # host is device: no second copy
            host = layout.read_params(0, layout.numel, rank, dtype=dtype).cpu()
            return HostParams(host=host.pin_memory() if self._pin(self.param.pin_memory) else host, device=device)
        if self.param_target == "nvme":
            store = NvmeParams(folder=SwapDir(root=self.param.nvme_path, label="params"), rank=rank,
                               numel=layout.numel, dtype=dtype, device=device,
                               buffer_count=self.param.buffer_count, pin=self._pin(self.param.pin_memory))
            step = max(1, min(self.param.buffer_size, layout.numel))
            for lo in range(0, layout.numel, step):
                store.file.write(lo, layout.read_params(lo, min(lo + step, layout.numel), rank, dtype=dtype))
            return store
        return None

    # -- after building: the optimizer the Engine steps through ---------------------------------
    def master_optimizer(self, zero: ZeroStage) -> MasterOptimizer:
        numel = zero.layout.numel
        segments = ShardSegments.of(zero)
        if self.target == "nvme":
            optimizer = build_optimizer(optimizer=self.optimizer_plan, kernels=self.kernels, numel=0, device=HOST,
                                        segments=segments)
            return NvmeMaster(zero=zero, optimizer=optimizer, state=self._swap, tile=self._tile,
                              buffers=self.opt.buffer_count, pin=self._pin(self.opt.pin_memory))
        master = zero.master if zero.master is not None else self._host_master
        optimizer = build_optimizer(optimizer=self.optimizer_plan, kernels=self.kernels, numel=numel,
                                    device=master.device, segments=segments)
        return ShardMaster(zero=zero, optimizer=optimizer, master=master)


def _validate(target: str, ratio: float, kernels: KernelsPlan, *, stage: int) -> None:
    problems = []
    if target != "none" and stage == 0:
        problems.append(Problem(f"{OPT_KEY}.device", "optimizer offload needs a ZeRO stage >= 1, but stage is 0",
                                given=target, suggestion="set zero_optimization.stage to 1, 2 or 3"))
    if target != "none" and kernels.optimizer == "cuda_fused":
        problems.append(Problem("kernels.optimizer", "an offloaded optimizer steps on the host, where "
                                "'cuda_fused' cannot run", given="cuda_fused",
                                suggestion="use cpu_adam (what zeroplan compile chooses with offload)"))
    if target != "none" and ratio < 1.0:
        problems.append(Problem(f"{OPT_KEY}.ratio", "partial optimizer offload (ratio < 1) is not supported by "
                                "this runtime; the whole shard is offloaded or none of it", given=ratio,
                                suggestion="set offload_optimizer.ratio to 1.0"))
    if problems:
        raise ConfigError(problems, source="plan (offload)")
