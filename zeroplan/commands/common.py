"""What every CLI command shares: user errors become messages and exit code 2, never a
traceback, and config notices are printed once each on stderr."""

from __future__ import annotations

import functools
import warnings
from typing import Callable, TypeVar

import typer

from zeroplan.schemas import ConfigError, ConfigWarning

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2


def print_problems(error: ConfigError) -> None:
    typer.echo(f"error: {error}", err=True)


def user_errors(fn: F) -> F:
    """Run a command: ConfigError -> its problems on stderr and exit 2; notices -> stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConfigWarning)
                return fn(*args, **kwargs)
        except ConfigError as e:
            print_problems(e)
            raise typer.Exit(EXIT_USER_ERROR) from None
        finally:  # outside catch_warnings: there, showwarning would append to `caught` itself
            _print_notices(caught)

    return wrapper  # type: ignore[return-value]


def _print_notices(caught: list[warnings.WarningMessage]) -> None:
    seen = set()
    for w in caught:
        text = str(w.message)
        if not issubclass(w.category, ConfigWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif text not in seen:
            seen.add(text)
            typer.echo(f"notice: {text}", err=True)
