"""The `zeroplan` command line: a table of command names to plain typed functions.

No logic lives here; each function parses its arguments and calls the library.
"""

from __future__ import annotations

import typer

from zeroplan.commands import clean, compile, config, export, probe, train, tune

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


def main() -> None:
    app()
