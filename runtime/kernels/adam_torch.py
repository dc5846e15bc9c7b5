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


def foreach_adam_step(
    *,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    bias_correction: bool,
    grad_scale: float,
) -> None:
    """One step with `torch._foreach_*`; same operation order as torch.optim.Adam/AdamW."""
    if grad_scale != 1.0:
        grads = torch._foreach_mul(grads, grad_scale)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bc1 = 1 - beta1 ** float(step) if bias_correction else 1.0
    bc2 = 1 - beta2 ** float(step) if bias_correction else 1.0
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2**0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -(lr / bc1))


def fused_adam_step(
    *,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    bias_correction: bool,
    grad_scale: float,
) -> None:
    """One step through torch.optim's fused Adam/AdamW kernel."""
    if not bias_correction:
        raise ValueError(
            "bias_correction=False is not supported by kernel 'torch_fused' (torch.optim always "
            "corrects bias); use kernel 'cpu_adam', 'cuda_fused' or 'torch_foreach'"
        )
    if grad_scale != 1.0:
        # torch's grad_scale argument divides and writes the result back into the gradient;
        # a scaled copy keeps our contract that `grad` is read-only.
        grads = torch._foreach_mul(grads, grad_scale)
    # torch.optim increments the step tensors before using them.
    steps = [torch.tensor(float(step - 1), device=p.device) for p in params]
    torch_adam_functional(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        fused=True,
        decoupled_weight_decay=decoupled,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )
