"""Adam/AdamW step on one rank's flat fp32 shard: the API the ZeRO runtime calls.

Semantics are torch.optim's: `decoupled=False` is torch.optim.Adam (L2 penalty added to the
gradient, Kingma & Ba 2015), `decoupled=True` is torch.optim.AdamW (Loshchilov & Hutter 2019,
parameter multiplied by 1 - lr * weight_decay). Two additions serve a ZeRO shard step:

- `grad_scale` multiplies the gradient as it is read: pass `clip_coef / loss_scale` and the
  unscale, the clip and the step are one pass over memory (with cpu_adam / cuda_fused);
- `bf16_out` receives `param.to(torch.bfloat16)` of the updated parameter, bit for bit,
  written while the value is in a register; it is what the rank all-gathers.

`grad` is never modified. The moments are updated in place; `step` is the 1-based count of
steps taken including this one, as torch.optim's `state["step"]` after its increment.
No process-group logic lives here: the caller reduces the gradient and all-gathers the copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zeroplan.runtime.kernels.adam_hyper import AdamHyper
from zeroplan.runtime.kernels.adam_torch import foreach_adam_step, fused_adam_step
from zeroplan.runtime.kernels.loader import CPU_ADAM, CUDA_ADAM
from zeroplan.runtime.kernels.select import OPTIMIZER_KERNELS, default_optimizer_kernel

SIMD_PATHS = ("auto", "avx512", "avx2", "scalar")
"""Values of `adam_step(simd=...)`; "auto" is the fastest path this CPU supports."""


def adam_step(
    *,
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
    bf16_out: Tensor | None = None,
    kernel: str | None = None,
    threads: int | None = None,
    simd: str = "auto",
) -> str:
    """One Adam/AdamW step on flat tensors; returns the kernel that ran.

    kernel: one of OPTIMIZER_KERNELS, already resolved for param's device (see
        `resolve_optimizer_kernel`); None picks the native kernel of the device, falling back
        to torch_foreach with one notice when it cannot be built.
    threads: OpenMP threads for cpu_adam; None means `torch.get_num_threads()`.
    simd: cpu_adam's instruction path, "auto" or one that `cpu_simd_paths()` lists; forcing
        one is for tests and benchmarks.
    """
    _check_tensors(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, bf16_out=bf16_out)
    hyper = AdamHyper(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      decoupled=decoupled, bias_correction=bias_correction, grad_scale=grad_scale)
    if kernel is None:
        kernel = default_optimizer_kernel(param.device)
    elif kernel not in OPTIMIZER_KERNELS:
        raise ValueError(f"kernel: unknown optimizer kernel {kernel!r}; choose one of {', '.join(OPTIMIZER_KERNELS)}")
    if simd not in SIMD_PATHS:
        raise ValueError(f"simd: must be one of {', '.join(SIMD_PATHS)}, got {simd!r}")
    if simd != "auto" and kernel != "cpu_adam":
        raise ValueError(f"simd: {simd!r} applies to kernel 'cpu_adam' only, not {kernel!r}")
    if kernel == "cpu_adam":
        _cpu_adam(param, grad, exp_avg, exp_avg_sq, bf16_out, hyper, threads, simd)
        return kernel
    if kernel == "cuda_fused":
        multi_tensor_adam_step(params=[param], grads=[grad], exp_avgs=[exp_avg], exp_avg_sqs=[exp_avg_sq],
                               hyper=hyper, bf16_outs=None if bf16_out is None else [bf16_out])
        return kernel
    torch_step = fused_adam_step if kernel == "torch_fused" else foreach_adam_step
    torch_step(params=[param], grads=[grad], exp_avgs=[exp_avg], exp_avg_sqs=[exp_avg_sq], hyper=hyper)
    if bf16_out is not None:
        bf16_out.copy_(param)
    return kernel


def multi_tensor_adam_step(
    *,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    hyper: AdamHyper,
    bf16_outs: Sequence[Tensor] | None = None,
) -> None:
    """cuda_fused over lists of CUDA tensors: one kernel launch per 24 tensors / 320 chunks of
    64 Ki elements (apex's multi_tensor_apply scheme). Same semantics as `adam_step`."""
    module = CUDA_ADAM.load() if torch.cuda.is_available() else None
    if module is None:
        reason = CUDA_ADAM.error or "torch sees no CUDA device"
        raise RuntimeError(f"kernel 'cuda_fused' is unavailable here: {reason}")
    module.multi_tensor_adam(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                             None if bf16_outs is None else list(bf16_outs), *hyper.native_args())


def cpu_simd_paths() -> tuple[str, ...]:
    """cpu_adam paths this CPU runs, fastest first ("scalar" always); () without the extension."""
    module = CPU_ADAM.load()
    return tuple(module.simd_paths()) if module is not None else ()


def _cpu_adam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, bf16_out: Tensor | None,
              hyper: AdamHyper, threads: int | None, simd: str) -> None:
    if param.device.type != "cpu":
        raise ValueError(f"param: kernel 'cpu_adam' needs CPU tensors, got {param.device}")
    if threads is None:
        threads = torch.get_num_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: must be a positive int or None, got {threads!r}")
    module = CPU_ADAM.load()
    if module is None:
        raise RuntimeError(f"kernel 'cpu_adam' is unavailable here: {CPU_ADAM.error}; "
                           "resolve the kernel with resolve_optimizer_kernel first")
    if simd != "auto" and simd not in module.simd_paths():
        raise ValueError(f"simd: {simd!r} is not supported by this CPU; it runs {', '.join(module.simd_paths())}")
    module.adam_step(param, grad, exp_avg, exp_avg_sq, bf16_out, *hyper.native_args(), threads, simd)


def _check_tensors(*, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                   bf16_out: Tensor | None) -> None:
    """Flat-buffer contract: same shape and device, fp32 (bf16 for the copy), contiguous."""
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if bf16_out is not None:
        named["bf16_out"] = bf16_out
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        want = torch.bfloat16 if name == "bf16_out" else torch.float32
        if t.dtype != want:
            raise ValueError(f"{name}: expected dtype {want}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (a flat buffer), got strides {t.stride()}")
        if t.shape != param.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != param's {tuple(param.shape)}")
        if t.device != param.device:
            raise ValueError(f"{name}: on {t.device} but param is on {param.device}")
