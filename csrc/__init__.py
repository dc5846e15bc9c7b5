"""C++ and CUDA sources of zeroplan's native kernels, shipped as package data.

This folder is the data package `zeroplan.csrc` (mapped in pyproject.toml, with
`*.cpp *.h *.cu` as package data), so the sources sit next to the installed code in an
editable install (the mapping points here) and in a wheel alike; `zeroplan.runtime.kernels`
finds them through this package's `__file__` and compiles them just in time.

- `cpu_adam/`: Adam/AdamW over flat fp32 buffers, AVX-512 / AVX2 / scalar with run-time
  dispatch, OpenMP over tiles, optional bf16 copy and gradient pre-multiplier.
- `cuda/`: multi-tensor fused Adam/AdamW, one launch over lists of tensors.
"""
