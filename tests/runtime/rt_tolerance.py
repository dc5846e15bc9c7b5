"""How close a distributed run must come to its single-process reference, and why.

Two correct runs of the same fp32 training differ only in the order of floating-point sums:
the reduction over ranks, the tp all-reduces, the blocking of another vector unit's kernels
(AVX2, AVX-512, a scalar fallback) or of a kernel that picks its path by memory alignment.
Each reordered sum is off by about 2^-24 relative, and a few optimizer steps carry that to
the parameters at a few 1e-7. PARAM_TOL = 1e-5 holds every ordinary element to that with a
wide margin, whatever CPU the suite runs on.

One kind of element escapes any such bound: a parameter whose gradient is analytically zero
and numerically the rounding noise of a cancellation. In the GPT that is the key bias, the
k third of every `attn.qkv.bias`: it adds q . b_k to every score of a query, and softmax is
invariant to shifting a row, so the exact gradient is 0 and the computed one is a residue of
1e-10 whose sign is set by the last bits of the arithmetic. Adam divides by the running RMS
of that residue, so each run moves the element by up to a full learning rate per step, in
its own direction. Those elements are held instead to the distance two Adam runs can drift
apart on pure noise (`noise_drift_bound`), and everything else stays at PARAM_TOL.

In fp32 that drift does not reach the other parameters: a shifted key bias changes the
scores by a constant per row, which softmax removes up to rounding. In bf16 nothing stays at
rounding level. Activations keep 8 mantissa bits, so two kernels that order a sum differently
round some elements the other way, and Adam carries those flips into the weights. A bf16 run is
therefore held, per parameter tensor, to an RMS difference of BF16_RMS_TOL, with every element
within `noise_drift_bound`. Where ranks and reference run the same kernels they agree to
rounding; under different kernels the spread stays well inside BF16_RMS_TOL, while a missing
reduction, a wrong shard or a lost step moves every element of a tensor by about a learning
rate, far outside it (test_tolerance.py checks both on the machine it runs on). The fp32
cases, which run the same sharding code, hold every element to PARAM_TOL.
"""

from __future__ import annotations

import math

import torch

from zeroplan.runtime.schedulers import build_schedule
from zeroplan.schemas import Plan

PARAM_TOL = 1e-5
"""Largest |difference| of an ordinary fp32 element (master weights) after the test's steps."""

BF16_RMS_TOL = 1e-4
"""Largest RMS difference over one parameter tensor of a run whose forward and backward are
in bf16 (or fp16)."""

ADAM_FAMILY = ("Adam", "AdamW")


def adam_step_bound(step: int, *, betas: tuple[float, float]) -> float:
    """The largest |m_hat / (sqrt(v_hat) + eps)| Adam can take at `step` (1-based), over any
    gradient sequence. By Cauchy-Schwarz on m_t = (1-b1) sum_i b1^(t-i) g_i against
    v_t = (1-b2) sum_i b2^(t-i) g_i^2:
        |m_t| / sqrt(v_t) <= (1-b1) sqrt(sum_{k<t} (b1^2/b2)^k / (1-b2)),
    times the bias corrections sqrt(1-b2^t) / (1-b1^t). It is 1 at the first step and is reached
    (test_tolerance); eps only lowers it. Kingma and Ba 2015, section 2.1, give the same ratio
    an approximate bound that a gradient sequence can exceed."""
    b1, b2 = betas
    ratio_sum = sum((b1 * b1 / b2) ** k for k in range(step))
    return (1 - b1) * math.sqrt(ratio_sum / (1 - b2)) * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)


def noise_drift_bound(plan: Plan, *, steps: int) -> float:
    """How far apart two correct runs of `plan` can move an element whose gradient is pure
    rounding noise: each run moves it at most lr_t * adam_step_bound(t) per step, weight decay
    only contracts the difference, clipping and loss scaling rescale the noise (Adam does not
    see a common scale). Outside the Adam family the noise is not amplified: PARAM_TOL."""
    optimizer = plan.optimizer
    if optimizer.type not in ADAM_FAMILY:
        return PARAM_TOL
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=optimizer)
    total = 0.0
    for t in range(1, steps + 1):
        total += schedule.lr() * adam_step_bound(t, betas=optimizer.betas)
        schedule.step()
    return 2 * total + PARAM_TOL


def gradient_free_elements(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Boolean masks of the elements whose gradient is analytically zero, by parameter name:
    the key third of every fused qkv bias laid out [q | k | v] (the built-in GPT's `qkv`,
    Hugging Face GPT-2's `c_attn`)."""
    masks = {}
    for name, module in model.named_modules():
        for attr in ("qkv", "c_attn"):
            fused = getattr(module, attr, None)
            bias = getattr(fused, "bias", None)
            if isinstance(fused, torch.nn.Module) and isinstance(bias, torch.nn.Parameter):
                hidden = bias.numel() // 3
                mask = torch.zeros(bias.numel(), dtype=torch.bool)
                mask[hidden:2 * hidden] = True
                masks[f"{name}.{attr}.bias" if name else f"{attr}.bias"] = mask
    return masks


def compare(got: dict, want: dict, *, model: torch.nn.Module, plan: Plan, steps: int,
            tol: float = PARAM_TOL) -> list[str]:
    """Every trainable parameter of `model` in `got` against `want`, as the module docstring says:
    gradient-free elements within `noise_drift_bound`; the others within `tol` in fp32, and in
    16-bit runs within `noise_drift_bound` with an RMS over the tensor within BF16_RMS_TOL. Returns the failures, worst first, each naming the
    parameter, the difference and the bound (empty when all hold)."""
    drift = noise_drift_bound(plan, steps=steps)
    sixteen_bit = plan.precision.param_dtype != "fp32"
    free = gradient_free_elements(model)
    failures = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        diff = (got[name].float() - want[name].float()).abs().flatten()
        mask = free.get(name, torch.zeros_like(diff, dtype=torch.bool))
        ordinary = diff[~mask]
        checks = [(diff[mask], drift, "max |diff| (gradient-free)")]
        if sixteen_bit:
            checks += [(ordinary, drift, "max |diff|"), (ordinary.square().mean().sqrt(), BF16_RMS_TOL, "RMS diff")]
        else:
            checks.append((ordinary, tol, "max |diff|"))
        for elements, bound, what in checks:
            worst = elements.max().item() if elements.numel() else 0.0
            if not worst <= bound:  # NaN fails too
                failures.append((worst / bound, f"{name}: {what} {worst:.3g} > {bound:.3g}"))
    return [message for _, message in sorted(failures, reverse=True)]
