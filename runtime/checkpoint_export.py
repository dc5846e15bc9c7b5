"""A sharded checkpoint of any layout as one safetensors file, offline (`zeroplan export`).

One process, no process group: the checkpoint is verified and joined by the same code a
resuming engine reads it with (checkpoint_source.py, reshard.consolidate), so an export is
refused for every reason a load is. Keys are the trained module's state_dict names, so a
plain model of the same class loads the file with `load_state_dict`; for a Hugging Face model
(whose config the checkpoint records) config.json is written beside it and the directory
loads with `from_pretrained`. Names of a tied parameter each get their own copy (safetensors
stores no shared tensors). Both files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zeroplan.schemas import ConfigError, Problem

from .checkpoint import resolve, write_tensors, write_text
from .checkpoint_source import Checkpoint
from .reshard import consolidate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_checkpoint(*, directory: str | Path, tag: str | None, out: str | Path, dtype: str = "fp32") -> Path:
    """Write `out`/model.safetensors (floating tensors in `dtype`; fp32 keeps the master
    weights exactly) and, for a Hugging Face model, `out`/config.json; returns the weights' path."""
    if dtype not in DTYPES:
        raise ConfigError(Problem("--dtype", f"is none of {', '.join(DTYPES)}", given=dtype))
    ckpt = Checkpoint(resolve(directory, tag))
    state = consolidate(ckpt)
    tensors, seen = {}, set()
    for name, value in state.items():
        if value.is_floating_point():
            value = value.to(DTYPES[dtype])
        tensors[name] = value.clone() if id(state[name]) in seen else value
        seen.add(id(state[name]))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        weights = out / "model.safetensors"
        write_tensors(weights, tensors, metadata={"format": "pt"})
        config = ckpt.meta.model.hf_config
        if config is not None:
            write_text(out / "config.json", json.dumps({**config, "torch_dtype": str(DTYPES[dtype])[6:]}, indent=2))
    except OSError as e:
        raise ConfigError(Problem("--out", f"cannot write: {e.strerror}", given=str(out))) from e
    return weights


__all__ = ["export_checkpoint"]
