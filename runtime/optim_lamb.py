"""Lamb (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2) on a rank's flat fp32 shard, with DeepSpeed's FusedLamb semantics.

Per tensor, as deepspeed/ops/csrc/lamb/fused_lamb_cuda_kernel.cu computes it:
  m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
  u = m / (sqrt(v) + eps) + wd p               (sqrt(v + eps) with eps_inside_sqrt)
  ratio = clamp(||p|| / ||u||, min_coeff, max_coeff), or 1 when either norm is 0
  p <- p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * ratio * u   (lr alone without bias correction)

The moments are element-wise; the ratio is not: it needs each tensor's whole ||p|| and ||u||,
while a ZeRO shard holds one chunk of every tensor. Phases of a step:
  1: moments and u on the shard (element-wise);
  2: each tensor's squared norms over its chunk (`ShardSegments.lengths`), fp64, one all-reduce
     of 2 x tensors values over the dp group (none at stage 0, where the shard is every tensor);
  3: scale each tensor's u by its ratio and step.
Padding elements (zero parameter, zero gradient) have u = 0 and add nothing to a norm. The
whole shard is stepped at once: NVMe tiles, stepped one after another, are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Collectives
from .optim import _AdamState


@dataclass(frozen=True)
class ShardSegments:
    """Where each tensor lies in the shard (consecutive lengths that cover it) and the group its
    other chunks live on (None: this rank holds every tensor whole)."""

    lengths: tuple[int, ...]
    coll: Collectives | None = None

    @classmethod
    def of(cls, zero) -> "ShardSegments":
        """The segments of a ZeRO stage's shard: one chunk per slot of its layout."""
        layout = zero.layout
        return cls(lengths=tuple(s.chunk for s in layout.slots), coll=zero.coll if layout.world > 1 else None)

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.coll is not None and self.coll.size > 1:
            self.coll.all_reduce(values)
        return values


class Lamb(_AdamState):
    def __init__(self, *, segments: ShardSegments | None, **kwargs):
        """`segments` None builds one only to read its `state_names`; it cannot step."""
        super().__init__(**kwargs)
        self.segments = segments

    def update(self, *, param, grad, state, lr, beta1=None) -> None:
        if self.segments is None:
            raise ValueError("Lamb needs the shard's tensor segments (ShardSegments) for its per-tensor trust ratio")
        if param.numel() != sum(self.segments.lengths):
            raise ValueError(f"Lamb steps the whole shard ({sum(self.segments.lengths)} elements) at once, got "
                             f"{param.numel()}: "
                             "its trust ratio needs whole-tensor norms, so NVMe tiles are not supported")
        p = self.plan
        b1, b2 = self._beta1(beta1), p.betas[1]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = exp_avg_sq.add(p.eps).sqrt_() if p.eps_inside_sqrt else exp_avg_sq.sqrt().add_(p.eps)
        update = exp_avg.div(denom)
        del denom
        if p.weight_decay:
            update.add_(param, alpha=p.weight_decay)
        ratios = self._trust_ratios(param, update)
        if p.bias_correction and self.segment_steps is not None:  # tensors that missed steps count their own
            sizes = [self._size(lr, b1, b2, float(t + 1)) for t in self.segment_steps]
            torch._foreach_mul_(list(update.split(self.segments.lengths)), [r * s for r, s in zip(ratios, sizes)])
            param.sub_(update)
            return
        torch._foreach_mul_(list(update.split(self.segments.lengths)), ratios)
        size = self._size(lr, b1, b2, float(self.steps.item())) if p.bias_correction else lr
        param.add_(update, alpha=-size)

    @staticmethod
    def _size(lr: float, b1: float, b2: float, step: float) -> float:
        """The step size with FusedLamb's bias correction folded in."""
        return lr * (1 - b2 ** step) ** 0.5 / (1 - b1 ** step)

    def _trust_ratios(self, param: torch.Tensor, update: torch.Tensor) -> list[float]:
        """||p|| / ||u|| per tensor over every rank's chunk, clamped; 1 where either is 0."""
        lengths = self.segments.lengths
        norms = torch._foreach_norm([*param.split(lengths), *update.split(lengths)], 2, dtype=torch.float64)
        squares = self.segments.sum_over_ranks(torch.stack(norms).square_())
        weight, step = squares.sqrt().split(len(lengths))
        p = self.plan
        ratio = torch.where((weight > 0) & (step > 0), (weight / step).clamp(p.min_coeff, p.max_coeff), 1.0)
        return ratio.tolist()
