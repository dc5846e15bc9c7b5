"""`zeroplan clean`: remove what runs killed with SIGKILL left behind.

A run keeps its swap files (NVMe offload) and its ranks' failure reports in private
directories marked with their owner (runtime/rundir.py). A run removes them as it ends, and
each new run removes those of dead owners it finds; this command does it now, for the
`nvme_path` directories given (or a plan's) and the temp directory. Directories of live
runs, of other users and of other hosts are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.schemas import ConfigError, Plan, Problem

from .common import user_errors


@user_errors
def clean(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="Directories to sweep (an offload nvme_path).", show_default=False)] = None,
    plan: Annotated[Optional[Path], typer.Option(
        "--plan", help="Also sweep this plan's nvme_path directories.")] = None,
) -> None:
    """Remove the swap and report directories of runs that were killed."""
    roots = list(paths or [])
    if plan is not None:
        offload = Plan.load(plan).offload
        roots += [Path(t.nvme_path) for t in (offload.optimizer, offload.param) if t.device == "nvme" and t.nvme_path]
    missing = [p for p in roots if not p.is_dir()]
    if missing:
        raise ConfigError([Problem("paths", f"{p} is not a directory", given=str(p)) for p in missing])
    from zeroplan.runtime.rundir import default_root, sweep

    removed = [path for root in dict.fromkeys([*roots, default_root()]) for path in sweep(root)]
    for path in removed:
        typer.echo(f"removed {path}")
    typer.echo(f"{len(removed)} directory(ies) of dead runs removed" if removed else "nothing left behind")
