"""Errors and notices of the config layer.

One root for user-facing config mistakes, `ConfigError(ValueError)`, carrying every problem
found in one pass. Each `Problem` names the dotted key path, the value given, what is wrong
and, where we can tell, what to do. The CLI prints them all and exits 2; library callers
catch `ConfigError` and read `.problems`.

Notices are not errors: a recognised DeepSpeed key that zeroplan does not use, a deprecated
key that was remapped, a key that has no effect at the chosen stage. They are emitted as
`ConfigWarning`s, so library users see them through Python's warnings machinery and the
CLI collects and prints them.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 6
_short.maxdict = 4

NOT_GIVEN = object()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config."""

    path: str
    """Dotted key path, e.g. `zero_optimization.offload_optimizer.device`; "" for the whole file."""
    message: str
    given: object = NOT_GIVEN
    suggestion: str | None = None

    def render(self) -> str:
        where = self.path or "<config>"
        text = f"{where}: {self.message}"
        if self.given is not NOT_GIVEN:
            text += f" (given: {_short.repr(self.given)})"
        if self.suggestion:
            text += f"; {self.suggestion}"
        return text


class ConfigError(ValueError):
    """A config (or the inputs compiled with it) is invalid; `.problems` lists every reason."""

    def __init__(self, problems: list[Problem] | Problem | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(path="", message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        head = f"{len(self.problems)} problem(s) in {self.source or 'config'}:"
        return "\n".join([head, *("  - " + p.render() for p in self.problems)])


class ConfigWarning(UserWarning):
    """A config notice: a key accepted but unused, remapped, or without effect."""


def raise_problems(problems: list[Problem]) -> None:
    """Raise the problems found by a block's cross-field rules, if any.

    Called from pydantic `model_validator`s: pydantic wraps the `ConfigError` in its
    `ValidationError`, and the loader unwraps it and prefixes each path with the block's.
    """
    if problems:
        raise ConfigError(problems)
