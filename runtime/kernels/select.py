"""Which optimizer kernel runs on a device: the Plan's `kernels.optimizer` values.

| kernel          | device | what                                                        |
|-----------------|--------|-------------------------------------------------------------|
| `cpu_adam`      | cpu    | zeroplan's C++ kernel (csrc/cpu_adam): one pass over memory |
| `cuda_fused`    | cuda   | zeroplan's multi-tensor CUDA kernel (csrc/cuda)             |
| `torch_fused`   | both   | torch.optim's fused Adam (`fused=True`)                     |
| `torch_foreach` | any    | `torch._foreach_*` ops; supports every option               |

A kernel that cannot run here (wrong device, or a native build that failed) is replaced by
the best one that can, with one `KernelWarning` naming why and what it costs; the same
fallback is announced once per process, not once per step.
"""

from __future__ import annotations

import threading
import warnings

import torch

from zeroplan.schemas.plan import OPTIMIZER_KERNELS
from zeroplan.runtime.kernels.loader import CPU_ADAM, CUDA_ADAM, KernelWarning, NativeExtension


_NATIVE: dict[str, tuple[str, NativeExtension]] = {
    "cpu_adam": ("cpu", CPU_ADAM),
    "cuda_fused": ("cuda", CUDA_ADAM),
}
_FALLBACK = "torch_foreach"
_announced: set[tuple[str, str, str]] = set()
_announce_lock = threading.Lock()


def available_optimizer_kernels(device: torch.device | str) -> tuple[str, ...]:
    """Kernels that can run on `device` now, fastest first.

    Asking about `cpu` builds the cpu_adam extension on first use (about a minute, once per
    machine); asking about `cuda` builds the CUDA one when torch sees a GPU.
    """
    dev = torch.device(device)
    kernels = [name for name in ("cpu_adam", "cuda_fused") if _native_reason(name, dev) is None]
    if dev.type in ("cpu", "cuda"):
        kernels.append("torch_fused")
    kernels.append("torch_foreach")
    return tuple(kernels)


def resolve_optimizer_kernel(requested: str, *, device: torch.device | str) -> str:
    """`requested` if it can run on `device`, else the best kernel that can (one notice).

    Raises ValueError if `requested` is not one of OPTIMIZER_KERNELS.
    """
    if requested not in OPTIMIZER_KERNELS:
        raise ValueError(
            f"requested: unknown optimizer kernel {requested!r}; choose one of {', '.join(OPTIMIZER_KERNELS)}"
        )
    dev = torch.device(device)
    if requested == "torch_fused" and dev.type not in ("cpu", "cuda"):
        return _fall_back(requested, dev, f"torch's fused Adam has no {dev.type} kernel")
    if requested in _NATIVE:
        reason = _native_reason(requested, dev)
        if reason is not None:
            return _fall_back(requested, dev, reason)
    return requested


def default_optimizer_kernel(device: torch.device | str) -> str:
    """The native kernel of `device`'s type when there is one (with the fallback notice if it
    cannot be built), else `torch_foreach`."""
    dev = torch.device(device)
    for name, (dev_type, _) in _NATIVE.items():
        if dev.type == dev_type:
            return resolve_optimizer_kernel(name, device=dev)
    return _FALLBACK


def _native_reason(name: str, device: torch.device) -> str | None:
    """Why native kernel `name` cannot run on `device`, or None when it can."""
    dev_type, extension = _NATIVE[name]
    if device.type != dev_type:
        return f"it runs on {dev_type} tensors, not {device.type}"
    if dev_type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if extension.load() is None:
        return extension.error
    return None


def _fall_back(requested: str, device: torch.device, reason: str) -> str:
    key = (requested, device.type, reason)
    with _announce_lock:
        first = key not in _announced
        _announced.add(key)
    if first:
        warnings.warn(
            f"optimizer kernel {requested!r} cannot run on {device.type}: {reason}. "
            f"Using {_FALLBACK!r} instead: same results, but each step makes about ten passes "
            "over memory instead of one, so the optimizer step is several times slower.",
            KernelWarning,
            stacklevel=3,
        )
    return _FALLBACK
