"""zeroplan's typed data: the training config (DeepSpeed key names), model spec, Plan, errors.

Importing this package never imports torch, so validation answers instantly.
"""

from .batch import BatchPlan, resolve_batch
from .cluster import CLUSTER_PRESETS, ClusterRates, ClusterSpec
from .config import TrainConfig
from .errors import ConfigError, ConfigWarning, Problem
from .jsonschema import train_config_schema
from .loader import load_config, validate_config
from .model import MODEL_PRESETS, ModelSpec
from .parallel import derive_degrees
from .plan import PLAN_VERSION, Plan
from .sources import apply_overrides, read_config_file
from .types import AUTO, Auto, is_auto

__all__ = [
    "AUTO",
    "Auto",
    "BatchPlan",
    "CLUSTER_PRESETS",
    "ClusterRates",
    "ClusterSpec",
    "MODEL_PRESETS",
    "ModelSpec",
    "PLAN_VERSION",
    "Plan",
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
