"""Built-in models and data for `zeroplan train` and profiling: the GPT presets and a
learnable synthetic next-token dataset."""

from zeroplan.schemas import MODEL_PRESETS, ModelSpec

from .data import MarkovChainData
from .gpt import GPT


def build_model(spec: ModelSpec | str) -> GPT:
    """The built-in GPT for a spec or a preset name (tiny, small, medium)."""
    if isinstance(spec, str):
        spec = ModelSpec.load(spec)
    return GPT(spec)


__all__ = ["GPT", "MODEL_PRESETS", "MarkovChainData", "build_model"]
