"""Optimizers that step one flat fp32 shard: the rank's master weights.

A ZeRO shard is one contiguous tensor, so every element-wise optimizer runs as a single
tensor update. `FlatOptimizer` is the small interface the master owners (runtime/offload)
call; implementations:
- `TorchAdam`: torch's functional Adam/AdamW (`torch.optim.adam.adam`, foreach or fused);
- `KernelAdam`: `zeroplan.runtime.kernels.adam_step`, the native kernel (plan.kernels.optimizer
  'cpu_adam' or 'cuda_fused'), with the same state tensors so checkpoints interchange;
- `TorchSGD`: torch's functional SGD with momentum, dampening and Nesterov;
- `Lion` (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2) and
  `Adagrad` (torch.optim.Adagrad's update), element-wise like Adam;
- `Lamb` (optim_lamb.py): not element-wise; its trust ratio needs every tensor's whole norm.

A step can also run tile by tile over state that does not live in the optimizer (NVMe
offload swaps each tile's state in and out): `begin_step()`, then `update(...)` once per tile
with that tile's element-wise state (named as `state_names`), then `end_step()`. The update is
element-wise, so any tiling gives the same result as one `step` over the whole shard.
"""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.plan import KernelsPlan, OptimizerPlan

if TYPE_CHECKING:
    from .optim_lamb import ShardSegments


class FlatOptimizer(ABC):
    """Steps `param` (flat fp32) with `grad` (flat fp32, already unscaled and clipped).

    `state` holds the element-wise state (one tensor per name of `state_names`, each as long
    as the shard; empty tensors when the state lives elsewhere); `counters` the scalar state.
    """

    state_names: tuple[str, ...] = ()
    segment_steps: tuple[int, ...] | None = None
    """An optimizer that steps the whole shard at once (Lamb): the steps each tensor's segment took
    before this one, set for an update when they differ (optim_runs.py); None: the shard's count."""

    def __init__(self, *, plan: OptimizerPlan, numel: int, device: torch.device):
        self.plan = plan
        self.state = {name: torch.zeros(numel, dtype=torch.float32, device=device) for name in self.state_names}

    def step(self, *, param: torch.Tensor, grad: torch.Tensor, lr: float, beta1: float | None = None) -> None:
        """One update of the whole shard; `beta1` overrides the plan's (OneCycle momentum cycling)."""
        self.begin_step()
        self.update(param=param, grad=grad, state=self.state, lr=lr, beta1=beta1)
        self.end_step()

    def begin_step(self) -> None:
        """Advance the counters of a step, before its first tile."""

    def end_step(self) -> None:
        """Finish a step, after its last tile."""

    @abstractmethod
    def update(self, *, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
               beta1: float | None = None) -> None:
        """Update one tile (or the whole shard) in place, with that tile's element-wise state."""

    @abstractmethod
    def counters(self) -> dict[str, torch.Tensor]:
        """The scalar state (step counts), as 0-d tensors."""

    def counters_at(self, steps_before: int) -> dict[str, float]:
        """The scalar state an update of elements that were stepped `steps_before` times before
        this step must see: torch.optim counts steps per parameter, and a parameter that had no
        gradient in some steps is behind the shard's count (optim_runs.py sets these per run)."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state, as named tensors (for checkpoints)."""
        return {**self.state, **self.counters()}

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
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = torch.zeros((), dtype=torch.float32)

    def begin_step(self) -> None:
        self.steps += 1

    def counters(self) -> dict[str, torch.Tensor]:
        return {"step": self.steps}

    def counters_at(self, steps_before: int) -> dict[str, float]:
        return {"step": float(steps_before + 1)}  # begin_step has counted this step

    def _beta1(self, beta1: float | None) -> float:
        return self.plan.betas[0] if beta1 is None else beta1


class TorchAdam(_AdamState):
    def __init__(self, *, fused: bool, **kwargs):
        super().__init__(**kwargs)
        self.fused = fused

    def update(self, *, param, grad, state, lr, beta1=None) -> None:
        p = self.plan
        # torch's functional Adam increments the step tensor it is given: hand it a copy of the
        # count before this step, so every tile of the step sees the same count.
        before = [(self.steps - 1).to(param.device)]
        _adam([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], before,
              foreach=None if self.fused else True, fused=True if self.fused else None,
              decoupled_weight_decay=p.decoupled_weight_decay, amsgrad=False, beta1=self._beta1(beta1),
              beta2=p.betas[1], lr=lr, weight_decay=p.weight_decay, eps=p.eps, maximize=False)


class KernelAdam(_AdamState):
    """`adam_step` of zeroplan.runtime.kernels: the native kernels, and torch_foreach for what
    torch's own Adam cannot do (bias_correction false)."""

    def __init__(self, *, adam_step, **kwargs):
        super().__init__(**kwargs)
        self.adam_step = adam_step

    def update(self, *, param, grad, state, lr, beta1=None) -> None:
        p = self.plan
        self.adam_step(param=param, grad=grad, exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"],
                       step=int(self.steps.item()), lr=lr, beta1=self._beta1(beta1), beta2=p.betas[1], eps=p.eps,
                       weight_decay=p.weight_decay, decoupled=p.decoupled_weight_decay,
                       bias_correction=p.bias_correction)


class TorchSGD(FlatOptimizer):
    def __init__(self, *, plan: OptimizerPlan, numel: int, device: torch.device):
        self.state_names = ("momentum_buffer",) if plan.momentum else ()
        super().__init__(plan=plan, numel=numel, device=device)
        self.started = torch.zeros((), dtype=torch.float32)

    def update(self, *, param, grad, state, lr, beta1=None) -> None:
        p = self.plan
        momentum = state.get("momentum_buffer")
        buffers = [momentum if self.started.item() else None]
        _sgd([param], [grad], buffers, weight_decay=p.weight_decay, momentum=p.momentum, lr=lr,
             dampening=p.dampening, nesterov=p.nesterov, maximize=False, foreach=False)
        if momentum is not None and not self.started.item():
            momentum.copy_(buffers[0])

    def end_step(self) -> None:
        self.started.fill_(1)

    def counters(self) -> dict[str, torch.Tensor]:
        return {"started": self.started}

    def counters_at(self, steps_before: int) -> dict[str, float]:
        return {"started": 1.0 if steps_before else 0.0}  # torch starts a momentum buffer at a first gradient


class Lion(FlatOptimizer):
    """c = beta1 m + (1 - beta1) g; p <- p (1 - lr wd) - lr sign(c); m <- beta2 m + (1 - beta2) g.

    sign(0) is 0, as in the paper: an element whose gradient and momentum are both exactly 0
    (a shard's padding, an embedding row no sample used) stays. DeepSpeed's kernels move it by
    lr instead (FusedLion takes c > 0 ? -lr : lr, DeepSpeedCPULion -copysign(lr, c)).
    """

    state_names = ("exp_avg",)

    def update(self, *, param, grad, state, lr, beta1=None) -> None:
        p = self.plan
        b1 = p.betas[0] if beta1 is None else beta1
        momentum = state["exp_avg"]
        direction = torch.lerp(grad, momentum, b1).sign_()
        if p.weight_decay:
            param.mul_(1 - lr * p.weight_decay)
        param.add_(direction, alpha=-lr)
        momentum.lerp_(grad, 1 - p.betas[1])

    def counters(self) -> dict[str, torch.Tensor]:
        return {}


class Adagrad(_AdamState):
    """torch.optim.Adagrad's update (lr_decay 0, initial accumulator 0), in its operation order:
    g += wd p; sum += g^2; p -= lr g / (sqrt(sum) + eps)."""

    state_names = ("sum",)

    def update(self, *, param, grad, state, lr, beta1=None) -> None:
        p = self.plan
        if p.weight_decay:
            grad = grad.add(param, alpha=p.weight_decay)
        squares = state["sum"]
        squares.addcmul_(grad, grad, value=1)
        param.addcdiv_(grad, squares.sqrt().add_(p.eps), value=-lr)


def _build_adam(*, kernels: KernelsPlan, segments: ShardSegments | None, **common) -> FlatOptimizer:
    """Adam and AdamW: the plan's native kernel, else torch's (whose functional Adam has no
    switch for bias correction: the foreach kernel of `adam_step` does)."""
    native = kernels.optimizer in ("cpu_adam", "cuda_fused")
    if native or not common["plan"].bias_correction:
        return KernelAdam(adam_step=_kernel_adam(kernels.optimizer if native else "torch_foreach"), **common)
    return TorchAdam(fused=kernels.optimizer == "torch_fused", **common)


def _build_lamb(*, kernels: KernelsPlan, segments: ShardSegments | None, **common) -> FlatOptimizer:
    from .optim_lamb import Lamb  # it builds on this module's FlatOptimizer

    return Lamb(segments=segments, **common)


def _element_wise(cls: type[FlatOptimizer]) -> Callable[..., FlatOptimizer]:
    return lambda *, kernels, segments, **common: cls(**common)


OPTIMIZER_BUILDERS: dict[str, Callable[..., FlatOptimizer]] = {
    "Adam": _build_adam,
    "AdamW": _build_adam,
    "SGD": _element_wise(TorchSGD),
    "Lamb": _build_lamb,
    "Lion": _element_wise(Lion),
    "Adagrad": _element_wise(Adagrad),
}
"""How each of `schemas.optim.OPTIMIZERS` is built; the kernel choice applies to Adam's."""


def build_optimizer(*, optimizer: OptimizerPlan, kernels: KernelsPlan, numel: int, device: torch.device,
                    segments: ShardSegments | None = None) -> FlatOptimizer:
    """The flat-shard optimizer for the plan's optimizer type and kernel choice.

    `numel` sizes the element-wise state it keeps; 0 when the caller keeps it (NVMe swap files).
    `segments`: where each tensor lies in the shard and how to sum over its shards; Lamb needs it.
    """
    return OPTIMIZER_BUILDERS[optimizer.type](kernels=kernels, segments=segments, plan=optimizer, numel=numel,
                                              device=device)


def _kernel_adam(name: str):
    try:
        return functools.partial(importlib.import_module("zeroplan.runtime.kernels").adam_step, kernel=name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(Problem("kernels.optimizer", f"{name!r} needs the native kernels "
                                  f"(zeroplan.runtime.kernels.adam_step), which are not available: {e}",
                                  suggestion="build the kernels, or compile the plan with torch_foreach")) from e
