"""The collectives of tensor parallelism, as autograd functions over the tp group.

Megatron-LM's conjugate pairs (Shoeybi et al. 2019, "Megatron-LM", section 3, figure 3, the
operators f and g):

    copy_to_tp       forward: identity          backward: all-reduce (sum)   Megatron's f
    reduce_from_tp   forward: all-reduce (sum)  backward: identity           Megatron's g
    gather_from_tp   forward: all-gather        backward: keep own slice     (last dimension)
    scatter_to_tp    forward: keep own slice    backward: all-gather         (last dimension)

A column-parallel layer starts with f (its input is replicated, so the gradient of that input
is the sum of every rank's partial gradient); a row-parallel layer ends with g (each rank holds
a partial sum of the output). So a transformer block costs two all-reduces forward (attention
output, MLP output) and two backward (attention input, MLP input).

Every function takes the tp `Collectives` (runtime/comm.py, bound to `groups.tp_group`),
never a global group. Its logger records the calls under "tp.<op>" in the Engine's comms
logger, next to the data-parallel collectives.

Uneven splits (a vocabulary of 97 rows over 2 ranks) are allowed: `split_sizes` gives the
first `n % parts` ranks one more row, and the gathers pad every rank's part to the largest
(gloo's all-gather needs equal sizes), then drop the padding.
"""

from __future__ import annotations

import torch

from ..comm import Collectives, CommsLogger, PrefixedLogger


def tp_collectives(*, group, logger: CommsLogger) -> Collectives:
    """Collectives over the tp group, logged as "tp.<op>"."""
    return Collectives(group=group, logger=PrefixedLogger(logger, "tp"))


def split_sizes(n: int, parts: int) -> tuple[int, ...]:
    """Sizes of `parts` consecutive pieces of `n`: the first `n % parts` take one more."""
    base, extra = divmod(n, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def piece(sizes: tuple[int, ...], index: int) -> tuple[int, int]:
    """[start, end) of piece `index`."""
    start = sum(sizes[:index])
    return start, start + sizes[index]


def gather_dim0(local: torch.Tensor, *, sizes: tuple[int, ...], coll: Collectives) -> list[torch.Tensor]:
    """Every rank's `local` (dimension 0 of size sizes[rank], other dimensions equal), in rank order."""
    rows, rest = max(sizes), local.shape[1:]
    padded = local.new_zeros((rows, *rest))
    padded[: local.shape[0]] = local
    out = local.new_empty((coll.size, rows, *rest))
    coll.all_gather(out.view(-1), padded.reshape(-1))
    return [out[r, : sizes[r]] for r in range(coll.size)]


def _gather_last(x: torch.Tensor, sizes: tuple[int, ...], coll: Collectives) -> torch.Tensor:
    parts = gather_dim0(x.movedim(-1, 0).contiguous(), sizes=sizes, coll=coll)
    return torch.cat(parts, dim=0).movedim(0, -1).contiguous()


def _own_last(x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start, end = piece(sizes, rank)
    return x[..., start:end].contiguous()


class _CopyToTp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coll):
        ctx.coll = coll
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # A copy: autograd may hand the same gradient tensor to another branch (x + y's backward).
        grad = grad.clone(memory_format=torch.contiguous_format)
        ctx.coll.all_reduce(grad)
        return grad, None


class _ReduceFromTp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coll):
        out = x.contiguous().clone()
        coll.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coll, sizes):
        ctx.coll, ctx.sizes = coll, sizes
        return _gather_last(x, sizes, coll)

    @staticmethod
    def backward(ctx, grad):
        return _own_last(grad, ctx.sizes, ctx.coll.rank), None, None


class _ScatterToTp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coll, sizes):
        ctx.coll, ctx.sizes = coll, sizes
        return _own_last(x, sizes, coll.rank)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad.contiguous(), ctx.sizes, ctx.coll), None, None


def copy_to_tp(x: torch.Tensor, coll: Collectives) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (the input of a column-parallel layer)."""
    return _CopyToTp.apply(x, coll)


def reduce_from_tp(x: torch.Tensor, coll: Collectives) -> torch.Tensor:
    """All-reduce forward; identity backward (the partial outputs of a row-parallel layer)."""
    return _ReduceFromTp.apply(x, coll)


def gather_from_tp(x: torch.Tensor, coll: Collectives, sizes: tuple[int, ...]) -> torch.Tensor:
    """All-gather along the last dimension forward; this rank's slice of the gradient backward."""
    return _GatherFromTp.apply(x, coll, sizes)


def scatter_to_tp(x: torch.Tensor, coll: Collectives, sizes: tuple[int, ...]) -> torch.Tensor:
    """This rank's slice of the last dimension forward; all-gather of the gradient backward."""
    return _ScatterToTp.apply(x, coll, sizes)


def sum_gradients_over_tp(params, coll: Collectives) -> None:
    """Sum each parameter's gradient over the tp group as autograd computes it, before it is
    accumulated into `.grad` (and before the ZeRO hooks that run after accumulation): for a
    module kept whole on every tp rank that sees only this rank's slice of a split activation
    (transformers' 'replicated_with_grad_allreduce'). One all-reduce per parameter per backward."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        coll.all_reduce(grad)
        return grad

    for p in params:
        if p.requires_grad:
            p.register_hook(hook)
