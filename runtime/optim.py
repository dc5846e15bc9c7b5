"""Optimizers that step one flat fp32 shard: the rank's master weights.

A ZeRO shard is one contiguous tensor, so every element-wise optimizer runs as a single
tensor update. `FlatOptimizer` is the small interface the Engine calls; implementations:
- `TorchAdam`: torch's functional Adam/AdamW (`torch.optim.adam.adam`, foreach or fused);
- `KernelAdam`: `zeroplan.runtime.kernels.adam_step`, the native kernel (plan.kernels.optimizer
  'cpu_adam' or 'cuda_fused'), with the same state tensors so checkpoints interchange;
- `TorchSGD`: torch's functional SGD with momentum, dampening and Nesterov.
"""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.plan import KernelsPlan, OptimizerPlan


class FlatOptimizer(ABC):
    """Steps `param` (flat fp32) with `grad` (flat fp32, already unscaled and clipped)."""

    @abstractmethod
    def step(self, *, param: torch.Tensor, grad: torch.Tensor, lr: float, beta1: float | None = None) -> None:
        """One update; `beta1` overrides the plan's (OneCycle momentum cycling)."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state, as named tensors (for checkpoints)."""

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_tensors()
        if set(own) != set(state):
            raise ValueError(f"optimizer state has {sorted(state)}, expected {sorted(own)}")
        for name, t in own.items():
            if t.shape != state[name].shape:
                raise ValueError(f"optimizer state {name} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(t.shape)}")
            t.copy_(state[name])


class _AdamState(FlatOptimizer):
    def __init__(self, *, plan: OptimizerPlan, numel: int, device: torch.device):
        self.plan = plan
        self.exp_avg = torch.zeros(numel, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(numel, dtype=torch.float32, device=device)
        self.steps = torch.zeros((), dtype=torch.float32)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.steps}


class TorchAdam(_AdamState):
    def __init__(self, *, fused: bool, **kwargs):
        super().__init__(**kwargs)
        self.fused = fused

    def step(self, *, param, grad, lr, beta1=None) -> None:
        p = self.plan
        _adam([param], [grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps],
              foreach=None if self.fused else True, fused=True if self.fused else None,
              decoupled_weight_decay=p.decoupled_weight_decay, amsgrad=False,
              beta1=p.betas[0] if beta1 is None else beta1, beta2=p.betas[1], lr=lr,
              weight_decay=p.weight_decay, eps=p.eps, maximize=False)


class KernelAdam(_AdamState):
    def __init__(self, *, adam_step, **kwargs):
        super().__init__(**kwargs)
        self.adam_step = adam_step

    def step(self, *, param, grad, lr, beta1=None) -> None:
        p = self.plan
        self.steps += 1
        self.adam_step(param=param, grad=grad, exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq,
                       step=int(self.steps.item()), lr=lr, beta1=p.betas[0] if beta1 is None else beta1,
                       beta2=p.betas[1], eps=p.eps, weight_decay=p.weight_decay,
                       decoupled=p.decoupled_weight_decay)


class TorchSGD(FlatOptimizer):
    def __init__(self, *, plan: OptimizerPlan, numel: int, device: torch.device):
        self.plan = plan
        self.momentum_buffer = torch.zeros(numel, dtype=torch.float32, device=device) if plan.momentum else None
        self.started = torch.zeros((), dtype=torch.float32)

    def step(self, *, param, grad, lr, beta1=None) -> None:
        p = self.plan
        buffers = [self.momentum_buffer if self.started.item() else None]
        _sgd([param], [grad], buffers, weight_decay=p.weight_decay, momentum=p.momentum, lr=lr,
             dampening=p.dampening, nesterov=p.nesterov, maximize=False, foreach=False)
        if self.momentum_buffer is not None and not self.started.item():
            self.momentum_buffer.copy_(buffers[0])
        self.started.fill_(1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"started": self.started}
        if self.momentum_buffer is not None:
            out["momentum_buffer"] = self.momentum_buffer
        return out


def build_optimizer(*, optimizer: OptimizerPlan, kernels: KernelsPlan, numel: int,
                    device: torch.device) -> FlatOptimizer:
    """The flat-shard optimizer for the plan's optimizer type and kernel choice."""
    if optimizer.type == "SGD":
        return TorchSGD(plan=optimizer, numel=numel, device=device)
    if kernels.optimizer in ("cpu_adam", "cuda_fused"):
        return KernelAdam(adam_step=_native_adam(kernels.optimizer), plan=optimizer, numel=numel, device=device)
    return TorchAdam(fused=kernels.optimizer == "torch_fused", plan=optimizer, numel=numel, device=device)


def _native_adam(name: str):
    try:
        return functools.partial(importlib.import_module("zeroplan.runtime.kernels").adam_step, kernel=name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(Problem("kernels.optimizer", f"{name!r} needs the native kernels "
                                  f"(zeroplan.runtime.kernels.adam_step), which are not available: {e}",
                                  suggestion="build the kernels, or compile the plan with torch_foreach")) from e
