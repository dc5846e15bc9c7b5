"""JSON Schema export of `TrainConfig`, for editors that complete and check configs."""

from typing import Any

from .config import TrainConfig

SCHEMA_ID = "https://zeroplan.dev/schemas/train-config.json"


def train_config_schema() -> dict[str, Any]:
    schema = TrainConfig.model_json_schema(by_alias=True, mode="validation")
    schema["$id"] = SCHEMA_ID
    schema["title"] = "zeroplan TrainConfig (DeepSpeed-compatible)"
    return schema
