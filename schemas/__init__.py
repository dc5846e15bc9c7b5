"""zeroplan's typed inputs: the training config (DeepSpeed key names) and its errors.

Importing this package never imports torch, so validation answers instantly.
"""

from .batch import BatchPlan, resolve_batch
from .config import TrainConfig
from .errors import ConfigError, ConfigWarning, Problem
from .jsonschema import train_config_schema
from .loader import load_config, validate_config
from .parallel import derive_degrees
from .sources import apply_overrides, read_config_file
from .types import AUTO, Auto, is_auto

__all__ = [
    "AUTO",
    "Auto",
    "BatchPlan",
    "ConfigError",
    "ConfigWarning",
    "Problem",
    "TrainConfig",
    "apply_overrides",
    "derive_degrees",
    "is_auto",
    "load_config",
    "read_config_file",
    "resolve_batch",
    "train_config_schema",
    "validate_config",
]
