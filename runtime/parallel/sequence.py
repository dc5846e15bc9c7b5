"""Sequence parallelism (Korthikanti et al. 2022, section 4.2.2) in the tensor-parallel layers.

With `parallel.sequence_parallel` the parts of a transformer layer that tensor parallelism
leaves replicated (the LayerNorms, the residual additions, and, in the built-in GPT, the
learned positions) run on this tp rank's 1/tp of the sequence: the activation between the
tensor-parallel regions is [batch, seq/tp, hidden]. So

- the vocabulary-parallel embedding reduce-scatters its partial sums instead of all-reducing
  them, and the positions are looked up for this rank's part of the sequence only;
- a column-parallel layer (qkv, fc, the LM head) all-gathers its input along the sequence
  (backward: reduce-scatter) and keeps only the shard for backward, gathering it again there
  for the weight gradient (Megatron-LM's LinearWithGradAccumulationAndAsyncCommunication), so
  the activation memory is that of equation 4, sbh(34/t + 5as/(ht));
- a row-parallel layer (proj, out) reduce-scatters its partial outputs instead of all-reducing
  them (backward: all-gather), then adds its bias to the shard.

Attention and the MLP's hidden layer see the whole sequence, split by heads and features as
before; the vocabulary-parallel loss gets the whole sequence's logits from the LM head.

A parameter replicated on every tp rank now sees part of the sequence, so its gradient is a
partial sum over tp: the Engine sums those gradients once per step, before the norm
(sequence_comm.sum_replicated_gradients). The tp layers' other parameters are split and their
gradients complete. Only the built-in GPT is laid out for this (GPT_SEQUENCE_PARALLEL_PLAN):
a model of one's own may apply a replicated parameter to the whole sequence, which the sum
would count tp times, so `initialize` refuses sequence parallelism for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import Collectives
from .sequence_comm import all_gather_sequence, reduce_scatter_along_sequence, sequence_piece


class _GatherColumnLinear(torch.autograd.Function):
    """y = gather(x) A^T + b for this rank's sequence shard x, keeping x (not the gathered input).

    Backward: 1: all-gather x again; 2: the input gradient dy A, reduce-scattered along the
    sequence (each rank's shard of the sum over the column slices); 3: the weight and bias
    gradients from the gathered x and the whole sequence's dy."""

    @staticmethod
    def forward(ctx, x, weight, bias, coll):
        ctx.coll, ctx.has_bias = coll, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(all_gather_sequence(x, coll), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        total = all_gather_sequence(x, ctx.coll)
        grad_input = reduce_scatter_along_sequence(grad.matmul(weight), ctx.coll)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = rows.t().matmul(total.reshape(-1, total.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None


def gather_column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         coll: Collectives) -> torch.Tensor:
    """A column-parallel linear on a sequence-sharded input [b, s/t, in] -> [b, s, out_local]."""
    return _GatherColumnLinear.apply(x, weight, bias, coll)


class SequenceParallelPositions(nn.Module):
    """Learned position embeddings (replicated) looked up for this tp rank's part of the sequence:
    given the positions of the whole sequence [s], returns [s/tp, hidden]."""

    def __init__(self, *, weight: nn.Parameter, coll: Collectives):
        super().__init__()
        self.weight, self.coll = weight, coll

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        start, end = sequence_piece(positions.shape[0], self.coll)
        return F.embedding(positions[start:end], self.weight)

    def extra_repr(self) -> str:
        return f"positions={self.weight.shape[0]}, dim={self.weight.shape[1]}, sequence 1/{self.coll.size}"
