"""zeroplan's own runtime at ZeRO stage 0-3: the plan the compiler emits for the workload
(`cpu` cluster preset, its default buckets and kernel choice), run by `zeroplan.runtime.initialize`."""

from __future__ import annotations

import importlib
from importlib import metadata

from torch import nn

from zeroplan.runtime import initialize

from ..workload import Workload, compile_plan
from .base import System, engine_train_step, stage_variant


class Zeroplan(System):
    stage: int
    offload: str = "none"

    @classmethod
    def version(cls) -> str:
        try:
            return metadata.version("zeroplan")
        except metadata.PackageNotFoundError:
            return "unknown"

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        self.plan = compile_plan(workload, stage=self.stage, offload=self.offload)
        self.engine = initialize(model, plan=self.plan)

    def train_step(self, micro_batches):
        return engine_train_step(self.engine, micro_batches)

    def close(self) -> None:
        self.engine.close()


class ZeroplanHeap(Zeroplan):
    """zeroplan's runtime leaving glibc's dynamic mmap threshold as it is, so freed host tensors
    stay in malloc's heap (runtime/host_memory.py says why the runtime fixes it): the reference
    bench/host_memory.py measures the fixed threshold's cost against."""

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        importlib.import_module("zeroplan.runtime.initialize").fix_mmap_threshold = lambda: False
        super().setup(model=model, workload=workload)


class ZeroplanHugePages(Zeroplan):
    """zeroplan's runtime with torch's THP_MEM_ALLOC_ENABLE=1: host tensors of at least 2 MiB
    are aligned to 2 MiB and advised onto transparent huge pages (when the kernel's THP mode is
    `madvise` or `always`), so a fresh activation faults once per 2 MiB instead of once per
    4 KiB page. torch reads the variable at its first allocation, so it must be in the rank's
    environment from the start: a launcher's choice, measured here before any launcher makes it."""

    @classmethod
    def env(cls) -> dict[str, str]:
        return {"THP_MEM_ALLOC_ENABLE": "1"}


class ZeroplanStaged(Zeroplan):
    """zeroplan's runtime publishing every all-gather bucket through a gather buffer, as on
    NCCL, even where gloo could gather a large parameter into its own storage
    (compiler.shards.publish_gathers): the reference bench/results/publish_in_place-*.md
    measures the in-place gathers against."""

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        shards = importlib.import_module("zeroplan.compiler.shards")
        base = importlib.import_module("zeroplan.runtime.zero.base")
        base.publish_gathers = lambda numels, ranges, **_: [shards.Gather(s, e, False) for s, e in ranges]
        super().setup(model=model, workload=workload)


def _stage(stage: int, offload: str = "none") -> type[Zeroplan]:
    return stage_variant(Zeroplan, prefix="zeroplan", stage=stage, offload=offload)


STAGES = [_stage(s) for s in range(4)]
OFFLOAD = [_stage(s, "cpu") for s in range(1, 4)]
"""Optimizer offload to CPU at stages 1-3 (the compiler refuses it at stage 0)."""
HEAP = [type(f"ZeroplanHeapZ{s}", (ZeroplanHeap, cls), {"name": f"{cls.name}-heap"}) for s, cls in enumerate(STAGES)]
HUGE_PAGES = [type(f"ZeroplanHugePagesZ{s}", (ZeroplanHugePages, cls), {"name": f"{cls.name}-thp"})
              for s, cls in enumerate(STAGES)]
"""Each stage on transparent huge pages (bench/results/huge_pages-*.md compares it with the stage as shipped)."""
STAGED = [type(f"ZeroplanStagedZ{s}", (ZeroplanStaged, cls), {"name": f"{cls.name}-staged"})
          for s, cls in enumerate(STAGES)]
"""Each stage publishing through gather buffers only (bench/results/publish_in_place-*.md)."""


class ShardedPeak:
    """Records the high-water mark once the model is built and sharded, just before the
    optimizer allocates its states (Offload.master_optimizer): the part of the start-up that
    building on meta changes (bench/sharded_init.py)."""

    def setup(self, *, model: nn.Module, workload: Workload) -> None:
        from zeroplan.runtime.offload import Offload

        from ..worker import peak_rss

        original = Offload.master_optimizer

        def recording(offload, zero):
            self.sharded_peak = peak_rss()
            return original(offload, zero)

        Offload.master_optimizer = recording
        try:
            super().setup(model=model, workload=workload)
        finally:
            Offload.master_optimizer = original

    def results(self) -> dict:
        return {"sharded_peak_rss_bytes": self.sharded_peak}


META = [type("ZeroplanPeakZ3", (ShardedPeak, STAGES[3]), {"name": "zeroplan-z3-peak"}),
        type("ZeroplanMetaZ3", (ShardedPeak, STAGES[3]), {"name": "zeroplan-z3-meta", "build_on_meta": True})]
"""ZeRO-3 with the model built on the meta device: each rank materialises its shard only
(runtime/meta_init.py; bench/sharded_init.py measures the start-up)."""
