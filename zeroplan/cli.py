"""The `zeroplan` command line: a table of command names to plain typed functions.

No logic lives here; each function parses its arguments and calls the library.
"""

from __future__ import annotations

from typing import Annotated

import typer

import zeroplan
from zeroplan.commands import clean, compile, config, env, export, probe, train, tune

COMMANDS = {
    "validate": config.validate,
    "schema": config.schema,
    "compile": compile.compile_plan,
    "estimate": compile.estimate,
    "probe": probe.probe,
    "autotune": tune.autotune,
    "report": tune.report,
    "train": train.train,
    "clean": clean.clean,
    "export": export.export_checkpoint,
    "env": env.env,
}

app = typer.Typer(
    name="zeroplan",
    help="Compile, tune and run distributed PyTorch training from one DeepSpeed-compatible config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"zeroplan {zeroplan.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print zeroplan's version and exit.")] = False,
) -> None:
    """Compile, tune and run distributed PyTorch training from one DeepSpeed-compatible config."""


def main() -> None:
    app()
