"""Straightforward per-tensor references for the optimizers zeroplan steps on a flat shard:
each tensor on its own, written from the formulas, with none of the runtime's code.

- Lamb: DeepSpeed's FusedLamb (deepspeed/ops/csrc/lamb/fused_lamb_cuda_kernel.cu): the trust
  ratio of the un-corrected update, the bias correction folded into the step size;
- Lion: Chen et al. 2023, Algorithm 2 (sign(0) = 0);
- Adam without bias correction (torch.optim.Adam always corrects);
- Adagrad: torch.optim.Adagrad itself.
"""

from __future__ import annotations

import torch

from zeroplan.schemas.plan import OptimizerPlan


class _PerTensor(torch.optim.Optimizer):
    """One tensor at a time with the plan's hyper-parameters and the group's (scheduled) lr."""

    def __init__(self, params, plan: OptimizerPlan):
        super().__init__(params, dict(lr=plan.lr))
        self.plan = plan

    @torch.no_grad()
    def step(self):
        lr = self.param_groups[0]["lr"]
        for p in self.param_groups[0]["params"]:
            self.update(p, self.state[p], lr=lr, betas=self.plan.betas)

    def update(self, p: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float]) -> None:
        raise NotImplementedError


class PerTensorLamb(_PerTensor):
    def update(self, p, state, *, lr, betas):
        o, (b1, b2) = self.plan, betas
        if not state:
            state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["step"] += 1
        m, v, t = state["m"], state["v"], state["step"]
        m.copy_(b1 * m + (1 - b1) * p.grad)
        v.copy_(b2 * v + (1 - b2) * p.grad * p.grad)
        denom = torch.sqrt(v + o.eps) if o.eps_inside_sqrt else torch.sqrt(v) + o.eps
        update = m / denom + o.weight_decay * p
        w_norm, u_norm = p.norm().item(), update.norm().item()
        ratio = min(max(w_norm / u_norm, o.min_coeff), o.max_coeff) if w_norm > 0 and u_norm > 0 else 1.0
        size = lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t) if o.bias_correction else lr
        p.sub_(size * ratio * update)


class PerTensorLion(_PerTensor):
    def update(self, p, state, *, lr, betas):
        (b1, b2) = betas
        m = state.setdefault("m", torch.zeros_like(p))
        c = b1 * m + (1 - b1) * p.grad
        p.mul_(1 - lr * self.plan.weight_decay).sub_(lr * torch.sign(c))
        m.copy_(b2 * m + (1 - b2) * p.grad)


class PerTensorAdamNoBiasCorrection(_PerTensor):
    def update(self, p, state, *, lr, betas):
        o, (b1, b2) = self.plan, betas
        if not state:
            state.update(m=torch.zeros_like(p), v=torch.zeros_like(p))
        g = p.grad if o.decoupled_weight_decay else p.grad + o.weight_decay * p
        if o.decoupled_weight_decay:
            p.mul_(1 - lr * o.weight_decay)
        state["m"].copy_(b1 * state["m"] + (1 - b1) * g)
        state["v"].copy_(b2 * state["v"] + (1 - b2) * g * g)
        p.sub_(lr * state["m"] / (torch.sqrt(state["v"]) + o.eps))


def reference_optimizer(params: list, plan: OptimizerPlan) -> torch.optim.Optimizer | None:
    """The reference for `plan`'s optimizer, or None where torch.optim's Adam/AdamW/SGD serve."""
    if plan.type == "Lamb":
        return PerTensorLamb(params, plan)
    if plan.type == "Lion":
        return PerTensorLion(params, plan)
    if plan.type == "Adagrad":
        return torch.optim.Adagrad(params, lr=plan.lr, eps=plan.eps, weight_decay=plan.weight_decay, foreach=False)
    if not plan.bias_correction:
        return PerTensorAdamNoBiasCorrection(params, plan)
    return None
