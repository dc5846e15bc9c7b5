"""Random-number-generator state as plain tensors and lists, so checkpoints can hold it
without pickled objects (`torch.load(weights_only=True)` reads it back)."""

from __future__ import annotations

import random

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional for the runtime
    np = None


def get_rng_state(device: torch.device) -> dict:
    version, internal, gauss = random.getstate()
    out = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state and np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
