"""The collectives of sequence parallelism, over the tp group, along the sequence dimension.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4.2.2 and figure 5: between the tensor-parallel regions the activations are split by
sequence instead of replicated, and Megatron's conjugate operators become

    g      forward: all-gather along the sequence     backward: reduce-scatter
    g-bar  forward: reduce-scatter along the sequence  backward: all-gather

An all-reduce is a reduce-scatter followed by an all-gather, so the ring bytes stay those of
plain tensor parallelism; the calls double. `reduce_scatter_sequence` is g-bar (after a
row-parallel layer and the vocabulary-parallel embedding); g is folded into the column-parallel
layer (sequence.py), which keeps the shard rather than the gathered input.

Activations are batch-first, [batch, seq, ...] (the built-in GPT's layout), split along
SEQ_DIM; each collective moves the sequence to the front for one flat, rank-major buffer
(gloo's all-gather and reduce-scatter take equal contiguous parts). Every call goes through
the tp `Collectives`, so the comms logger records it as "tp.<op>".
"""

from __future__ import annotations

import torch

from zeroplan.schemas import ConfigError, Problem

from ..comm import Collectives

SEQ_DIM = 1
"""The sequence dimension of an activation ([batch, seq, hidden])."""


def sequence_piece(seq: int, coll: Collectives) -> tuple[int, int]:
    """[start, end) of this tp rank's part of a sequence of `seq` positions; ConfigError when
    `seq` is not divisible by the tp degree."""
    if seq % coll.size:
        raise ConfigError(Problem("parallel.sequence_parallel", f"sequence length {seq} is not divisible by "
                                  f"tp({coll.size}): each tp rank holds seq / tp positions", given=True,
                                  suggestion=f"feed sequences whose length is a multiple of {coll.size}, or "
                                  "compile with parallel.sequence_parallel false"))
    per = seq // coll.size
    return coll.rank * per, (coll.rank + 1) * per


def all_gather_sequence(x: torch.Tensor, coll: Collectives) -> torch.Tensor:
    """Every tp rank's sequence shard [b, s/t, ...] joined in rank order: [b, s, ...]."""
    local = x.movedim(SEQ_DIM, 0).contiguous()
    out = local.new_empty((coll.size * local.shape[0], *local.shape[1:]))
    coll.all_gather(out.view(-1), local.view(-1))
    return out.movedim(0, SEQ_DIM)


def reduce_scatter_along_sequence(x: torch.Tensor, coll: Collectives) -> torch.Tensor:
    """The sum over tp ranks of `x` [b, s, ...], this rank's sequence shard of it: [b, s/t, ...]."""
    sequence_piece(x.shape[SEQ_DIM], coll)
    whole = x.movedim(SEQ_DIM, 0).contiguous()
    out = whole.new_empty((whole.shape[0] // coll.size, *whole.shape[1:]))
    coll.reduce_scatter(out.view(-1), whole.view(-1))
    return out.movedim(0, SEQ_DIM).contiguous()


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coll):
        ctx.coll = coll
        return reduce_scatter_along_sequence(x, coll)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_sequence(grad, ctx.coll).contiguous(), None


def reduce_scatter_sequence(x: torch.Tensor, coll: Collectives) -> torch.Tensor:
    """g-bar: partial sums [b, s, ...] -> this rank's sequence shard of their sum; backward, the
    all-gather of the shards' gradients."""
    return _ReduceScatterSequence.apply(x, coll)


def sum_replicated_gradients(grad: torch.Tensor, *, runs: list[tuple[int, int]], coll: Collectives) -> None:
    """Sum over tp, in place, the ranges `runs` of a flat gradient shard: one all-reduce.

    A parameter replicated on every tp rank (a norm, a row-parallel bias, the learned positions)
    acts under sequence parallelism on this rank's part of the sequence only, so each tp rank
    holds a partial gradient; summed, every tp rank holds the whole one, as without sequence
    parallelism. The ranges are the same elements in the same order on every tp rank: each
    rank's ZeRO shard holds the same chunk of every replicated parameter (zero/layout.py).
    Summing once per step is enough: the dp reduction and the accumulation are sums too."""
    if not runs:
        return
    parts = [grad[lo:hi] for lo, hi in runs]
    joined = torch.cat(parts)
    coll.all_reduce(joined)
    at = 0
    for part in parts:
        part.copy_(joined[at:at + part.numel()])
        at += part.numel()
