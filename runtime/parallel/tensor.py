"""Tensor-parallel layers (Megatron-LM style) over the tp group, as plain modules.

Shoeybi et al. 2019, "Megatron-LM", section 3: a column-parallel linear keeps a slice of the
output features (its input replicated, its output split); a row-parallel linear keeps a slice
of the input features (its input split, partial outputs summed by an all-reduce, the bias
added once after it). Column then row, as in attention (qkv, proj) and the MLP (fc, out),
needs no communication in between: one all-reduce forward and one backward per pair.
The vocabulary-parallel embedding keeps a slice of the vocabulary rows (a lookup outside the
slice gives zeros; the all-reduce sums the one rank's row into place), and the
vocabulary-parallel cross-entropy computes the loss from each rank's slice of the logits
without gathering them (section 3, last paragraph).

Parameters are plain tensors (`nn.Parameter`), each rank holding its slice, so the ZeRO
stages shard them over the dp group like any other parameter (flat shards, per-parameter
hooks). A split parameter carries a `tp_split` attribute (`TpSplit`: which dimension, each
rank's size, how many fused blocks) that the gradient norm and the consolidated export read;
a parameter without it is replicated on every tp rank (norms, row-parallel biases).

Each layer takes `sequence_parallel` (sequence.py): its input or output between the tensor-
parallel regions is then this rank's part of the sequence, and its all-reduce an all-gather
or a reduce-scatter along the sequence.

The linear layers take `transposed` for transformers' Conv1D (GPT-2), whose weight is stored
[in, out]: the parameter keeps that layout (and its name and shape in the model's state_dict,
so Hugging Face checkpoints still load), split along dim 1 for column and dim 0 for row
parallelism, and the matmul uses its transpose.

torch.distributed.tensor.parallel (torch 2.13): `parallelize_module` with ColwiseParallel /
RowwiseParallel runs on gloo with CPU tensors and matches a single-process forward, but the
parameters become DTensors: `p.data.copy_(plain_tensor)` fails ("mixed torch.Tensor and
DTensor"), gradients arrive as DTensors in the ZeRO hooks, and stage 3's release
(`p.data = placeholder`) assumes plain storage; its ColwiseParallel also cannot split a fused
[q|k|v] weight by heads. Hence these layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..comm import Collectives
from .sequence import gather_column_linear
from .sequence_comm import reduce_scatter_sequence
from .tensor_comm import copy_to_tp, gather_dim0, gather_from_tp, piece, reduce_from_tp, scatter_to_tp


@dataclass(frozen=True)
class TpSplit:
    """How a full tensor is cut across tp ranks."""

    dim: int
    """Dimension of the full tensor that is split."""
    sizes: tuple[int, ...]
    """Each rank's extent of one fused block along `dim`, in tp-rank order."""
    fused: int = 1
    """The full `dim` is `fused` equal blocks side by side ([q|k|v] is 3), each split alike."""

    def take(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s slice of `full`."""
        start, end = piece(self.sizes, rank)
        blocks = full.chunk(self.fused, dim=self.dim)
        return torch.cat([b.narrow(self.dim, start, end - start) for b in blocks], dim=self.dim)

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's slice (the inverse of `take`)."""
        blocks = []
        for b in range(self.fused):
            blocks += [p.narrow(self.dim, b * n, n) for p, n in zip(parts, self.sizes)]
        return torch.cat(blocks, dim=self.dim)

    def gather(self, local: torch.Tensor, coll: Collectives) -> torch.Tensor:
        """The full tensor from this rank's slice (a collective over the tp group)."""
        moved = local.movedim(self.dim, 0).contiguous()
        parts = gather_dim0(moved, sizes=tuple(self.fused * n for n in self.sizes), coll=coll)
        return self.merge([p.movedim(0, self.dim) for p in parts])


def tp_split_of(tensor: torch.Tensor) -> TpSplit | None:
    """The split of a tensor-parallel parameter; None for one replicated on every tp rank."""
    return getattr(tensor, "tp_split", None)


def _parameter(full: torch.Tensor, split: TpSplit | None, rank: int, requires_grad: bool) -> nn.Parameter:
    local = full.detach() if split is None else split.take(full.detach(), rank)
    p = nn.Parameter(local.clone(), requires_grad=requires_grad)
    if split is not None:
        p.tp_split = split
    return p


def shard_parameter(full: torch.Tensor, split: TpSplit | None, coll: Collectives) -> nn.Parameter:
    """This rank's slice of `full` as a new parameter, marked with its split."""
    return _parameter(full, split, coll.rank, full.requires_grad)


def _matrix(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The [out, in] matrix F.linear takes: a Conv1D's [in, out] weight transposed (a view)."""
    return weight.t() if transposed else weight


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's rows (output features) split: this rank computes its slice of y.

    Forward: copy_to_tp(x) (identity; its backward all-reduces dx), then the local matmul;
    with `gather_output` the slices are all-gathered into the full y. With `sequence_parallel`
    x is this rank's sequence shard, all-gathered along the sequence (backward: reduce-scatter).
    """

    def __init__(self, *, weight: nn.Parameter, bias: nn.Parameter | None, coll: Collectives,
                 out_sizes: tuple[int, ...], gather_output: bool = False, sequence_parallel: bool = False,
                 transposed: bool = False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.coll, self.out_sizes, self.gather_output = coll, out_sizes, gather_output
        self.sequence_parallel, self.transposed = sequence_parallel, transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _matrix(self.weight, self.transposed)
        if self.sequence_parallel:
            y = gather_column_linear(x, weight, self.bias, self.coll)
        else:
            y = F.linear(copy_to_tp(x, self.coll), weight, self.bias)
        return gather_from_tp(y, self.coll, self.out_sizes) if self.gather_output else y

    def extra_repr(self) -> str:
        out, in_ = _matrix(self.weight, self.transposed).shape
        return f"in={in_}, out_local={out}, tp={self.coll.size}" + (", transposed" if self.transposed else "")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's columns (input features) split; partial outputs all-reduced.

    Forward: (scatter_to_tp(x) unless the input is already this rank's slice, as after a
    column-parallel layer), the local matmul, reduce_from_tp (all-reduce; identity backward),
    then the bias, which is replicated and added once. With `sequence_parallel` the partial
    outputs are reduce-scattered along the sequence instead (backward: all-gather).
    """

    def __init__(self, *, weight: nn.Parameter, bias: nn.Parameter | None, coll: Collectives,
                 in_sizes: tuple[int, ...], input_is_parallel: bool = True, sequence_parallel: bool = False,
                 transposed: bool = False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.coll, self.in_sizes, self.input_is_parallel = coll, in_sizes, input_is_parallel
        self.sequence_parallel, self.transposed = sequence_parallel, transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.coll, self.in_sizes)
        reduce = reduce_scatter_sequence if self.sequence_parallel else reduce_from_tp
        y = reduce(F.linear(x, _matrix(self.weight, self.transposed)), self.coll)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        out, in_ = _matrix(self.weight, self.transposed).shape
        return f"in_local={in_}, out={out}, tp={self.coll.size}" + (", transposed" if self.transposed else "")


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows [vocab_start, vocab_end) live on this rank.

    Ids outside the slice look up zeros; the all-reduce (identity backward) sums each id's one
    owning row into every rank's output. The gradient touches local rows only. With
    `sequence_parallel` the sum is reduce-scattered: each rank gets its part of the sequence.
    `padding_idx` (a global id, as nn.Embedding's) gets no gradient on the rank owning its row.
    """

    def __init__(self, *, weight: nn.Parameter, coll: Collectives, vocab_start: int, sequence_parallel: bool = False,
                 padding_idx: int | None = None):
        super().__init__()
        self.weight, self.coll, self.vocab_start = weight, coll, vocab_start
        self.sequence_parallel, self.padding_idx = sequence_parallel, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        pad = None if self.padding_idx is None else self.padding_idx - self.vocab_start
        pad = pad if pad is not None and 0 <= pad < self.weight.shape[0] else None
        out = F.embedding(local.masked_fill(outside, 0), self.weight, padding_idx=pad)
        reduce = reduce_scatter_sequence if self.sequence_parallel else reduce_from_tp
        return reduce(out.masked_fill(outside.unsqueeze(-1), 0.0), self.coll)

    def extra_repr(self) -> str:
        start = self.vocab_start
        return f"rows=[{start}, {start + self.weight.shape[0]}), dim={self.weight.shape[1]}, tp={self.coll.size}"


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-split logits [N, V_local] (Megatron's
    vocab_parallel_cross_entropy): 1: all-reduce MAX of the row maxima (for stability; the
    loss does not depend on it, so it is a constant for autograd); 2: one all-reduce (SUM) of
    [sum of exp(logit - max), the target's shifted logit (zero on ranks not owning it)];
    loss = log(sum exp) - target logit. Backward: softmax - one_hot(target), locally."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, coll):
        ctx.dtype = logits.dtype
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        coll.all_reduce(row_max, op=dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)
        local = target - vocab_start
        inside = (local >= 0) & (local < logits.shape[-1])
        index = local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
        picked = shifted.gather(-1, index).squeeze(-1) * inside
        exp = shifted.exp_()
        stats = torch.stack([exp.sum(dim=-1), picked])
        coll.all_reduce(stats)
        ctx.save_for_backward(exp.div_(stats[0].unsqueeze(-1)), index, inside)
        return stats[0].log() - stats[1]

    @staticmethod
    def backward(ctx, grad):
        softmax, index, inside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, index, -inside.to(g.dtype).unsqueeze(-1))
        g.mul_(grad.unsqueeze(-1))
        return g.to(ctx.dtype), None, None, None


class VocabParallelCrossEntropy(nn.Module):
    """F.cross_entropy(logits, target) for logits split by vocabulary across the tp group.

    `logits` [N, V_local] are this rank's columns [vocab_start, vocab_start + V_local);
    `target` [N] holds global ids. Same reductions and `ignore_index` as F.cross_entropy.
    """

    def __init__(self, *, coll: Collectives, vocab_start: int, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.coll, self.vocab_start = coll, vocab_start
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        loss = _VocabParallelCE.apply(logits, target.masked_fill(~valid, 0), self.vocab_start, self.coll)
        loss = loss * valid
        if self.reduction == "none":
            return loss
        total = loss.sum()
        return total if self.reduction == "sum" else total / valid.sum()
