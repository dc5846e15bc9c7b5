"""`zeroplan env`: what this machine gives zeroplan (DeepSpeed's `ds_report`), for bug reports
and for knowing which native kernels will run before a training does."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import user_errors


@user_errors
def env(
    build: Annotated[bool, typer.Option("--build", help="Build the native kernels that are not built yet "
                                        "(about a minute each) instead of reporting them as not built.")] = False,
) -> None:
    """Report versions, the torch build, collectives, CPU vector units, compilers, native kernels and extras."""
    from zeroplan.runtime.environment import environment_report, render_text  # imports torch

    typer.echo(render_text(environment_report(build=build)), nl=False)
