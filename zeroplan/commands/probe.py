"""`zeroplan probe`: measure this machine and write a ClusterSpec for `--cluster local`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.atomic import atomic_write_text

from .common import user_errors


@user_errors
def probe(
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Ranks per node to measure with "
                                                 "(default: GPUs, or usable cores on cpu).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="ClusterSpec JSON to write.")] = Path("cluster.json"),
    path: Annotated[Path, typer.Option("--path", help="Directory whose disk is measured (the NVMe offload "
                                       "target).")] = Path("."),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes: seconds instead of a minute, "
                                        "noisier figures.")] = False,
) -> None:
    """Measure matmul, memory, collective and disk rates; write them as a cluster spec."""
    if not path.is_dir():
        raise ConfigError(Problem("--path", "is not a directory", given=str(path),
                                  suggestion="give an existing directory"))
    from zeroplan.runtime.probe import probe_cluster  # imports torch: only this command pays for it

    spec = probe_cluster(nproc=nproc, path=path, quick=quick)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, spec.to_json() + "\n")
    except OSError as e:
        raise ConfigError(Problem("-o", f"cannot write: {e.strerror}", given=str(output))) from e
    r = spec.rates
    typer.echo(f"{spec.device_name}: {spec.nproc_per_node} rank(s); matmul fp32 {r.matmul_flops_fp32 / 1e9:.3g} "
               f"GFLOP/s, bf16 {r.matmul_flops_16bit / 1e9:.3g} GFLOP/s; copy {r.memory_bandwidth / 1e9:.3g} GB/s; "
               f"all-reduce {r.intra_node_bandwidth / 1e9:.3g} GB/s, {r.intra_node_latency * 1e6:.3g} us/step; "
               f"disk write {r.disk_write_bandwidth / 1e9:.3g} / read {r.disk_read_bandwidth / 1e9:.3g} GB/s")
    typer.echo(f"wrote {output}")
