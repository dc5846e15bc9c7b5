"""zeroplan: a declarative config compiler and auto-tuner for distributed PyTorch training.

The facade re-exports the library's entry points. Heavy parts (the torch runtime, Optuna)
load on first use, so `import zeroplan` and the config commands stay instant.
"""

from importlib import import_module
from typing import Any

from zeroplan.schemas import AUTO, ConfigError, ConfigWarning, TrainConfig, load_config

__version__ = "0.1.0"

_LAZY = {
    "compile": ("zeroplan.compiler", "compile"),
    "tune": ("zeroplan.autotune.tune", "tune"),
    "initialize": ("zeroplan.runtime", "initialize"),
    "TrialComplete": ("zeroplan.runtime.metrics", "TrialComplete"),
    "gathered": ("zeroplan.runtime.gathered", "gathered"),
    "register_external_parameter": ("zeroplan.runtime.gathered", "register_external_parameter"),
    "ParameterNotGathered": ("zeroplan.runtime.zero.released", "ParameterNotGathered"),
}

__all__ = ["AUTO", "ConfigError", "ConfigWarning", "TrainConfig", "load_config", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'zeroplan' has no attribute {name!r}")
