"""The whole trained model for other tools: the consolidated state dict and Hugging Face's
`save_pretrained`, at every ZeRO stage.

`engine.save_pretrained(directory)` writes what the model's own `save_pretrained` would write
for the trained weights, every rank calling it:
  1. every rank: the consolidated state dict (a collective; tied names share one tensor, as in
     the model, so Hugging Face drops the copies it drops: GPT-2's lm_head, not an untied
     Llama lm_head);
  2. rank 0: the model's own `save_pretrained(tmp, state_dict=...)` into a new directory beside
     the target (the same file system), every file fsync'ed;
  3. rank 0: a target that does not exist is the temp directory renamed; into an existing one
     each file is renamed over its old version, and weight shards the new save does not have
     are removed (Hugging Face's own clean-up), so other files there (a tokenizer) stay;
  4. every rank learns whether rank 0 succeeded (one all-reduce) and returns after the files
     are in place, or raises.
A crash leaves the target as it was, or (an existing target) each file old or new, never cut.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .agree import Agreement
from .checkpoint import _fsync_dir

SHARD = re.compile(r".+-\d{5}-of-\d{5}\.(safetensors|bin)")
"""A weight shard file name, as Hugging Face's clean-up of a previous save matches it."""


def in_model_dtype(state: dict[str, torch.Tensor], *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype` (the model was cast to it whole), each storage converted once,
    so names that shared a tensor still do."""
    out, converted = {}, {}
    for name, value in state.items():
        if value.is_floating_point() and value.dtype != dtype:
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if key not in converted:
                converted[key] = value.to(dtype)
            value = converted[key]
        out[name] = value
    return out


def check_pretrained(model: nn.Module) -> None:
    """Refuse, on every rank and before any collective, a model without `save_pretrained`."""
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"engine.save_pretrained needs a Hugging Face model (one with save_pretrained); the engine "
                        f"trains a {type(model).__name__}. Use engine.consolidated_state_dict() and save it yourself")


def save_pretrained(model: nn.Module, *, state_dict: dict[str, torch.Tensor], directory: str | Path, rank: int,
                    device: torch.device, **kwargs) -> Path:
    """Phases 2-4 of the module docstring; `kwargs` go to the model's save_pretrained."""
    directory = Path(directory)
    error: BaseException | None = None
    if rank == 0:
        try:
            _write(model, state_dict=state_dict, directory=directory, kwargs=kwargs)
        except Exception as e:  # every rank hears of it below
            error = e
    failures = Agreement(device=device).failures(error)
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(f"rank 0 could not save the model to {directory}: {failures[0][1]}")
    return directory


def _write(model: nn.Module, *, state_dict: dict, directory: Path, kwargs: dict) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(tmp, state_dict=dict(state_dict), is_main_process=True, **kwargs)
        for f in (f for f in tmp.iterdir() if f.is_file()):
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if not directory.exists():
            os.rename(tmp, directory)
        else:
            new = {f.name for f in tmp.iterdir()}
            for name in sorted(new):
                os.replace(tmp / name, directory / name)
            for old in directory.iterdir():
                if old.is_file() and old.name not in new and SHARD.fullmatch(old.name):
                    old.unlink()
        _fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["check_pretrained", "in_model_dtype", "save_pretrained"]
