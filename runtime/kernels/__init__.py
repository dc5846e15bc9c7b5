"""Native optimizer kernels and how they are chosen, built and called.

- `adam.py`: `adam_step` on a rank's flat fp32 shard (and `multi_tensor_adam_step` for lists
  of CUDA tensors), the API the ZeRO runtime calls;
- `select.py`: the Plan's `kernels.optimizer` values, which can run where, and the fallback;
- `loader.py`: just-in-time build and cache of the C++/CUDA sources in `zeroplan.csrc`;
- `adam_torch.py`: the pure-PyTorch kernels (`torch_foreach`, `torch_fused`);
- `adam_hyper.py`: `AdamHyper`, one step's hyper-parameters as every kernel takes them.
"""

from zeroplan.runtime.kernels.adam_hyper import AdamHyper
from zeroplan.runtime.kernels.adam import SIMD_PATHS, adam_step, cpu_simd_paths, multi_tensor_adam_step
from zeroplan.runtime.kernels.loader import KernelWarning
from zeroplan.runtime.kernels.select import (
    OPTIMIZER_KERNELS,
    available_optimizer_kernels,
    default_optimizer_kernel,
    resolve_optimizer_kernel,
)

__all__ = [
    "AdamHyper",
    "OPTIMIZER_KERNELS",
    "SIMD_PATHS",
    "KernelWarning",
    "adam_step",
    "available_optimizer_kernels",
    "cpu_simd_paths",
    "default_optimizer_kernel",
    "multi_tensor_adam_step",
    "resolve_optimizer_kernel",
]
