"""One Adam/AdamW step's hyper-parameters: what every Adam kernel (cpu_adam, cuda_fused,
torch's fused and foreach steps) takes, defined and checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AdamHyper:
    """`step` is 1-based (torch.optim's `state["step"]` after its increment); `decoupled` is
    AdamW's weight decay; `grad_scale` multiplies the gradient as it is read."""

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    bias_correction: bool = True
    grad_scale: float = 1.0

    def __post_init__(self) -> None:
        """The ranges torch.optim.Adam checks, plus a 1-based integer step and a finite grad_scale."""
        step = self.step
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step: must be an int >= 1 (1-based, as torch.optim counts), got {step!r}")
        rules = (
            ("lr", self.lr, self.lr >= 0.0, ">= 0"),
            ("beta1", self.beta1, 0.0 <= self.beta1 < 1.0, "in [0, 1)"),
            ("beta2", self.beta2, 0.0 <= self.beta2 < 1.0, "in [0, 1)"),
            ("eps", self.eps, self.eps >= 0.0, ">= 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0.0, ">= 0"),
            ("grad_scale", self.grad_scale, math.isfinite(self.grad_scale), "finite"),
        )
        for name, value, ok, want in rules:
            if not ok:
                raise ValueError(f"{name}: must be {want}, got {value!r}")

    def native_args(self) -> tuple:
        """The positional arguments the native kernels take after their tensors."""
        return (float(self.step), self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.decoupled,
                self.bias_correction, self.grad_scale)
