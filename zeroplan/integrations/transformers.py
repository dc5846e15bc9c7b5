"""`transformers.Trainer` through zeroplan: `ZeroplanTrainer(..., config="ds_config.json")`.

Needs the `transformers` extra (`pip install 'zeroplan[transformers]'`: transformers and
accelerate); see zeroplan/runtime/hf_trainer.py for what it does.
"""

try:
    import transformers as _transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("zeroplan.integrations.transformers needs transformers and accelerate: "
                      "pip install 'zeroplan[transformers]'") from e

from zeroplan.runtime.hf_trainer import EngineModule, ZeroplanTrainer
from zeroplan.runtime.hf_trainer_config import fill_from_training_args

__all__ = ["EngineModule", "ZeroplanTrainer", "fill_from_training_args"]
