"""`zeroplan compile` and `zeroplan estimate`: parse arguments, call the compiler, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.schemas import ClusterSpec, ModelSpec, load_config

from .common import user_errors
from .config import ConfigArg, SetOpt

ModelOpt = Annotated[str, typer.Option("--model", help="Model preset (tiny, small, medium, 1b, 7b, 13b, 70b) "
                                       "or a ModelSpec JSON file.", show_default=False)]
ClusterOpt = Annotated[str, typer.Option("--cluster", help="Cluster preset (a100-40, a100-80, h100-80, h200-141, "
                                         "cpu), 'local' (the probe's cluster.json) or a ClusterSpec JSON file.",
                                         show_default=False)]
NnodesOpt = Annotated[Optional[int], typer.Option("--nnodes", min=1, help="Nodes (default: the cluster's).")]
NprocOpt = Annotated[Optional[int], typer.Option("--nproc-per-node", min=1,
                                                 help="Ranks per node (default: the cluster's).")]


@user_errors
def compile_plan(
    config: ConfigArg,
    model: ModelOpt,
    cluster: ClusterOpt,
    nnodes: NnodesOpt = None,
    nproc_per_node: NprocOpt = None,
    resolve_auto: Annotated[bool, typer.Option("--resolve-auto", help="Decide 'auto' fields with the cost model "
                                               "instead of refusing them.")] = False,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for plan.json, launch.sh, launch.sbatch, "
                                      "report.md and ds_config.json.")] = Path("out"),
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Memory calibration JSON "
                                                        "from profiled runs.")] = None,
) -> None:
    """Compile a config for a model and cluster into a plan and its launch files."""
    from zeroplan.compiler import Calibration, compile
    from zeroplan.compiler.emit import emit

    cfg = load_config(config, overrides=set_ or ())
    spec, machines = ModelSpec.load(model), ClusterSpec.load(cluster)
    calib = Calibration.load(calibration) if calibration is not None else None
    plan = compile(cfg, spec, machines, nnodes=nnodes, nproc_per_node=nproc_per_node, resolve_auto=resolve_auto,
                   calibration=calib)
    shaped = machines.with_shape(nnodes=nnodes, nproc_per_node=nproc_per_node)
    written = emit(plan, config=cfg, model=spec, cluster=shaped, out=out, source=str(config))
    est = plan.estimates
    typer.echo(f"plan: {plan.world.world_size} rank(s), dp {plan.parallel.dp} x tp {plan.parallel.tp} x pp "
               f"{plan.parallel.pp}, ZeRO stage {plan.zero.stage}, batch {plan.batch.global_batch_size}")
    typer.echo(f"memory per rank: {sum(est.memory_per_rank.values()) / 2**30:.2f} GiB of "
               f"{est.memory_limit_per_rank / 2**30:.2f} GiB; predicted step {est.predicted_step_time_s:.4g} s")
    for path in written:
        typer.echo(f"wrote {path}")
    for warning in est.warnings:
        typer.echo(f"warning: {warning}", err=True)


@user_errors
def estimate(
    model: ModelOpt,
    cluster: ClusterOpt,
    nnodes: NnodesOpt = None,
    nproc_per_node: NprocOpt = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1, help="Samples per rank per forward.")] = 1,
    checkpointing: Annotated[bool, typer.Option("--activation-checkpointing",
                                                help="Recompute blocks in backward.")] = False,
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel degree (dp is the rest).")] = 1,
) -> None:
    """Per-rank memory for every ZeRO stage x offload option, and which fit."""
    from zeroplan.compiler.estimate_table import estimate_rows, render_table

    spec = ModelSpec.load(model)
    machines = ClusterSpec.load(cluster).with_shape(nnodes=nnodes, nproc_per_node=nproc_per_node)
    rows = estimate_rows(spec, machines, micro_batch=micro_batch, checkpointing=checkpointing, tp=tp)
    typer.echo(render_table(rows, model=spec, cluster=machines))
