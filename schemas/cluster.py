"""`ClusterSpec`: the machines a plan runs on, as the compiler's memory and cost models need them.

Two sources of figures, never mixed silently: `rates_source="nominal"` for the presets
(published datasheet numbers, which real runs do not reach), `"measured"` for the file that
`zeroplan probe` writes. The `local` preset name reads that file (`cluster.json` in the
working directory).

Nominal sources, per preset:
- A100: NVIDIA A100 Tensor Core GPU datasheet (SXM4): bf16 312 TFLOP/s dense, fp32 19.5 TFLOP/s,
  HBM2 1555 GB/s (40 GB) and HBM2e 2039 GB/s (80 GB), NVLink 600 GB/s both directions,
  PCIe Gen4 x16. DGX A100 user guide: 8 x 200 Gb/s HDR InfiniBand per node, 1-2 TB host memory.
- H100 / H200: NVIDIA H100 and H200 Tensor Core GPU datasheets (SXM5): bf16 989 TFLOP/s dense,
  fp32 67 TFLOP/s, HBM3 3.35 TB/s (H100) and HBM3e 4.8 TB/s (H200), NVLink 900 GB/s both
  directions, PCIe Gen5 x16. DGX H100/H200: 8 x 400 Gb/s NDR InfiniBand per node, 2 TB host memory.
- Latencies are typical NCCL ring-step figures, not datasheet values.
- `cpu`: rounded `zeroplan probe` figures of a small shared CPU box (2 cores, 24 GiB, gloo), to
  be replaced by a probe of the machine at hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from .errors import ConfigError, Problem
from .types import FrozenModel

GiB = 1 << 30
CollectiveOp = Literal["all_reduce", "all_gather", "reduce_scatter", "send_recv"]
LOCAL_CLUSTER_FILE = "cluster.json"
"""Where the `local` preset is read from (relative to the working directory)."""


class ClusterRates(FrozenModel):
    """Throughputs in units per second, per rank unless said otherwise."""

    matmul_flops_fp32: float = Field(gt=0)
    """FLOP/s of a large fp32 matmul on one device."""
    matmul_flops_16bit: float = Field(gt=0)
    """FLOP/s of a large bf16/fp16 matmul on one device."""
    memory_bandwidth: float = Field(gt=0)
    """Bytes/s of device memory (a large copy counts read + write)."""
    host_memory_bandwidth: float = Field(gt=0)
    """Bytes/s of host memory available to one rank (the offloaded optimizer step)."""
    intra_node_bandwidth: float = Field(gt=0)
    """Bytes/s one rank sends in a ring collective within a node (NCCL's "bus bandwidth")."""
    intra_node_latency: float = Field(ge=0)
    """Seconds per ring step within a node."""
    inter_node_bandwidth: float = Field(gt=0)
    """Bytes/s one rank sends in a ring collective that spans nodes."""
    inter_node_latency: float = Field(ge=0)
    """Seconds per ring step across nodes."""
    host_to_device_bandwidth: float = Field(gt=0)
    """Bytes/s of one host<->device copy (pinned memory)."""
    disk_write_bandwidth: float = Field(gt=0)
    """Bytes/s written to the NVMe path by one node."""
    disk_read_bandwidth: float = Field(gt=0)
    """Bytes/s read from the NVMe path by one node."""
    intra_node_collective_bandwidth: dict[CollectiveOp, float] = {}
    """Bytes/s (ring accounting) of one kind of collective within a node, where it differs from
    `intra_node_bandwidth` (the all-reduce's): gloo's all-gather and reduce-scatter reach a
    fraction of its all-reduce rate. Kinds not listed use `intra_node_bandwidth`."""
    micro_step_overhead: float = Field(default=0.0, ge=0)
    """Seconds of fixed work per micro-step on one rank, whatever the model's size: the forward
    and backward calls, the loss, the engine's bookkeeping. 0: not measured."""
    layer_overhead: float = Field(default=0.0, ge=0)
    """Seconds of fixed work per transformer block per micro-step, forward and backward together
    (operator dispatch, autograd nodes, per-parameter hooks), whatever the block's width.
    The cost model charges `micro_step_overhead + layers * layer_overhead` per micro-step;
    on an accelerator this work overlaps queued kernels, so the nominal presets leave it 0.
    0: not measured."""

    @field_validator("intra_node_collective_bandwidth")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"bandwidths must be > 0 bytes/s, given {bad}")
        return value

    def collective_bandwidth(self, op: str, *, inter_node: bool) -> float:
        """Bytes/s of one `op` (all_reduce, all_gather, reduce_scatter, send_recv)."""
        if inter_node:
            return self.inter_node_bandwidth
        return self.intra_node_collective_bandwidth.get(op, self.intra_node_bandwidth)


class ClusterSpec(FrozenModel):
    name: str
    nnodes: int = Field(default=1, ge=1)
    nproc_per_node: int = Field(ge=1)
    """Ranks per node (one per GPU on cuda)."""
    device: Literal["cpu", "cuda"]
    device_name: str = ""
    device_memory_bytes: int = Field(gt=0)
    """Memory of one device. On cpu the ranks share host memory; see `memory_per_rank`."""
    host_memory_bytes: int = Field(gt=0)
    """Host memory of one node."""
    nvme_path: str | None = None
    """Directory the disk figures were measured under; None when not measured."""
    nvme_free_bytes: int = Field(default=0, ge=0)
    """Free bytes under nvme_path (per node)."""
    rates: ClusterRates
    rates_source: Literal["nominal", "measured"]
    """nominal: datasheet figures (optimistic); measured: written by `zeroplan probe`."""
    notes: tuple[str, ...] = ()
    """How figures were obtained, and which were not measured."""
    runtime_overhead_bytes: int | None = Field(default=None, gt=0)
    """Device bytes a rank holds before any model tensor (interpreter, torch, the process group;
    the CUDA context and NCCL's buffers on cuda), measured by `zeroplan probe`; None: the
    memory model's default for the device (compiler/memory.py RUNTIME_OVERHEAD)."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def memory_per_rank(self) -> int:
        """Bytes one rank may use: the device's memory, or an equal share of host memory on cpu."""
        if self.device == "cpu":
            return min(self.device_memory_bytes, self.host_memory_bytes // self.nproc_per_node)
        return self.device_memory_bytes

    def with_shape(self, *, nnodes: int | None = None, nproc_per_node: int | None = None) -> "ClusterSpec":
        """The same machines with another node or process count (`--nnodes`, `--nproc-per-node`)."""
        update = {k: v for k, v in (("nnodes", nnodes), ("nproc_per_node", nproc_per_node)) if v is not None}
        problems = [Problem(f"--{k.replace('_', '-')}", "must be >= 1", given=v) for k, v in update.items() if v < 1]
        if problems:
            raise ConfigError(problems, source="command line")
        return self.model_copy(update=update)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, source: str | Path) -> "ClusterSpec":
        """A preset name, `local` (the probe's `cluster.json`), or a JSON file of ClusterSpec fields."""
        name = str(source)
        if name in CLUSTER_PRESETS:
            return CLUSTER_PRESETS[name]
        path = Path(LOCAL_CLUSTER_FILE if name == "local" else name)
        if not path.is_file():
            hint = ("run `zeroplan probe -o cluster.json` first" if name == "local"
                    else "presets: " + ", ".join([*CLUSTER_PRESETS, "local"]))
            raise ConfigError(Problem("", f"unknown cluster preset or missing file {str(path)!r}", suggestion=hint),
                              source="--cluster")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError, ValidationError) as e:
            raise ConfigError(Problem("", f"not a valid cluster spec: {' '.join(str(e).split())[:400]}"),
                              source=str(path)) from e


def _nvidia(name: str, *, memory_gib: float, tflops16: float, tflops32: float, hbm: float, nvlink_both: float,
            pcie: float, ib_gbit: float, host_tib: float, nvme_tb: float) -> ClusterSpec:
    rates = ClusterRates(
        matmul_flops_fp32=tflops32 * 1e12, matmul_flops_16bit=tflops16 * 1e12, memory_bandwidth=hbm * 1e9,
        host_memory_bandwidth=400e9 / 8,  # two sockets of DDR at ~200 GB/s each, shared by 8 ranks
        intra_node_bandwidth=nvlink_both / 2 * 1e9, intra_node_latency=5e-6,
        inter_node_bandwidth=ib_gbit / 8 * 1e9, inter_node_latency=1.5e-5,
        host_to_device_bandwidth=pcie * 1e9, disk_write_bandwidth=4e9, disk_read_bandwidth=6e9)
    return ClusterSpec(
        name=name, nnodes=1, nproc_per_node=8, device="cuda", device_name=name,
        device_memory_bytes=int(memory_gib * GiB), host_memory_bytes=int(host_tib * 1024 * GiB),
        nvme_free_bytes=int(nvme_tb * 1e12), rates=rates, rates_source="nominal",
        notes=("nominal datasheet figures; measured throughput is typically 40-70% of them",))


CLUSTER_PRESETS: dict[str, ClusterSpec] = {
    "a100-40": _nvidia("a100-40", memory_gib=40, tflops16=312, tflops32=19.5, hbm=1555, nvlink_both=600,
                       pcie=32, ib_gbit=200, host_tib=1, nvme_tb=15),
    "a100-80": _nvidia("a100-80", memory_gib=80, tflops16=312, tflops32=19.5, hbm=2039, nvlink_both=600,
                       pcie=32, ib_gbit=200, host_tib=2, nvme_tb=30),
    "h100-80": _nvidia("h100-80", memory_gib=80, tflops16=989, tflops32=67, hbm=3350, nvlink_both=900,
                       pcie=64, ib_gbit=400, host_tib=2, nvme_tb=30),
    "h200-141": _nvidia("h200-141", memory_gib=141, tflops16=989, tflops32=67, hbm=4800, nvlink_both=900,
                        pcie=64, ib_gbit=400, host_tib=2, nvme_tb=30),
    "cpu": ClusterSpec(
        name="cpu", nnodes=1, nproc_per_node=2, device="cpu", device_name="cpu",
        device_memory_bytes=24 * GiB, host_memory_bytes=24 * GiB, nvme_free_bytes=20 * GiB,
        rates=ClusterRates(
            matmul_flops_fp32=4e10, matmul_flops_16bit=1e9, memory_bandwidth=8e9, host_memory_bandwidth=4e9,
            intra_node_bandwidth=8e8, intra_node_latency=3e-4, inter_node_bandwidth=1e8, inter_node_latency=1e-3,
            host_to_device_bandwidth=8e9, disk_write_bandwidth=1e8, disk_read_bandwidth=5e8,
            intra_node_collective_bandwidth={"all_gather": 2.5e8, "reduce_scatter": 2.5e8},
            micro_step_overhead=1e-3, layer_overhead=2e-3),
        rates_source="nominal",
        notes=("figures of a shared 2-core, 24 GiB AMD EPYC box (zeroplan probe, rounded, one thread per rank, "
               "gloo); run `zeroplan probe` for this machine's",)),
}
"""Built-in clusters: one node of 8 GPUs (or 2 CPU ranks); `--nnodes`/`--nproc-per-node` reshape them."""
