"""The training runtime: Engine, ZeRO stages 0-3, buckets, precision, checkpoints.

    engine = zeroplan.initialize(model, plan="plan.json")
    for batch in data:
        loss = engine(**batch); engine.backward(loss); engine.step()

Importing the package imports no torch: `Engine`, `initialize` and `PLAN_ENV` load on first
use (PEP 562), so its torch-free modules (procs.py, lifeline.py) serve the tuner, which never
imports torch.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

_LAZY = {"Engine": "engine", "PLAN_ENV": "run_env", "initialize": "initialize"}

__all__ = ["Engine", "PLAN_ENV", "initialize"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps `zeroplan.runtime.initialize` the function, as an eager `from .initialize import
    initialize` here made it: importlib sets a package's attribute to each submodule it loads,
    and the submodule of that name, loaded first by any import of it, would hide the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "initialize" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
