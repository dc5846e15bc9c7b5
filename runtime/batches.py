"""What the engine does with a micro-batch as the user's loop hands it over: cast its floating
tensors to the training dtype, count its tokens for the throughput meter, call the model with it
(a dict as keyword arguments, a tuple or list as positional ones) and find the loss in what the
model returned. Shared by the Engine and the PipelineEngine."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def cast_floats(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, Mapping):
        return type(obj)((k, cast_floats(v, dtype)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    return obj


def count_tokens(obj) -> int:
    """Tokens in a micro-batch: the elements of its first 2-D integer tensor (ids), else 0."""
    stack = [obj]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if not item.is_floating_point() and item.dim() == 2:
                return item.numel()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return 0


def call_model(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def loss_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"forward returned {type(out).__name__} with "
                    f"{'loss None' if getattr(out, 'loss', 0) is None else 'no loss'}: pass labels or return the "
                    "loss (train_batch takes a tensor, a dict with 'loss', or a tuple starting with it; a Hugging "
                    "Face model computes its loss only when given labels)")
