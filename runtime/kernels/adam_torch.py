"""Pure-PyTorch Adam/AdamW steps with the semantics of zeroplan's native kernels.

`torch_foreach` mirrors torch.optim's multi-tensor Adam (torch/optim/adam.py,
`_multi_tensor_adam`) with `torch._foreach_*` ops, and adds what torch.optim lacks and the
native kernels have: no bias correction (DeepSpeed's `bias_correction: false`) and a gradient
pre-multiplier. It supports every option, so it is the fallback when a native kernel cannot be
built; it makes about ten passes over memory where cpu_adam makes one.

`torch_fused` calls torch.optim's functional Adam with `fused=True` (one fused kernel on CPU
and CUDA). torch always applies bias correction, so `bias_correction=False` is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam_functional

from .adam_hyper import AdamHyper


def foreach_adam_step(
    *,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdamHyper,
) -> None:
    """One step with `torch._foreach_*`; same operation order as torch.optim.Adam/AdamW."""
    h = hyper
    if h.grad_scale != 1.0:
        grads = torch._foreach_mul(grads, h.grad_scale)
    if h.weight_decay != 0:
        if h.decoupled:
            torch._foreach_mul_(params, 1 - h.lr * h.weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=h.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - h.beta1)
    torch._foreach_mul_(exp_avg_sqs, h.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - h.beta2)
    bc1 = 1 - h.beta1 ** float(h.step) if h.bias_correction else 1.0
    bc2 = 1 - h.beta2 ** float(h.step) if h.bias_correction else 1.0
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2**0.5)
    torch._foreach_add_(denom, h.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -(h.lr / bc1))


def fused_adam_step(
    *,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdamHyper,
) -> None:
    """One step through torch.optim's fused Adam/AdamW kernel."""
    h = hyper
    if not h.bias_correction:
        raise ValueError(
            "bias_correction=False is not supported by kernel 'torch_fused' (torch.optim always "
            "corrects bias); use kernel 'cpu_adam', 'cuda_fused' or 'torch_foreach'"
        )
    if h.grad_scale != 1.0:
        # torch's grad_scale argument divides and writes the result back into the gradient;
        # a scaled copy keeps our contract that `grad` is read-only.
        grads = torch._foreach_mul(grads, h.grad_scale)
    # torch.optim increments the step tensors before using them.
    steps = [torch.tensor(float(h.step - 1), device=p.device) for p in params]
    torch_adam_functional(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True,
                          decoupled_weight_decay=h.decoupled, amsgrad=False, beta1=h.beta1, beta2=h.beta2,
                          lr=h.lr, weight_decay=h.weight_decay, eps=h.eps, maximize=False)
