"""Shard and bucket arithmetic that the compiler's models and the runtime's ZeRO stages share
(runtime/zero/layout.py imports it): one definition, so a predicted count is the count run.

A tensor of n elements sharded over W ranks is padded to W * ceil(n / W) elements (gloo's
all-gather and reduce-scatter need equal parts); a bucket is a run of consecutive tensors whose
padded sizes sum to at most the bucket size, one tensor at least. Bucket sizes count all
ranks' elements, as DeepSpeed's count the unsharded gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


def chunk(numel: int, world: int) -> int:
    """Elements of a tensor each of `world` ranks holds (ceil(numel / world))."""
    return -(-numel // world)


def padded(numels: Sequence[int], *, world: int) -> int:
    """Elements of the tensors once each is padded to a multiple of `world`."""
    return sum(chunk(n, world) * world for n in numels)


def pack_buckets(numels: Sequence[int], *, world: int, max_elements: int, reverse: bool) -> list[tuple[int, int]]:
    """Index ranges [start, end) of the buckets, in launch order: from the last tensor when
    `reverse` (the order backward produces gradients in), else from the first."""
    order = range(len(numels) - 1, -1, -1) if reverse else range(len(numels))
    groups: list[list[int]] = []
    size = 0
    for i in order:
        n = chunk(numels[i], world) * world
        if groups and size + n <= max_elements:
            groups[-1].append(i)
            size += n
        else:
            groups.append([i])
            size = n
    return [(min(g), max(g) + 1) for g in groups]


def collectives_per_rank(backend: str) -> bool:
    """Whether reduce-scatter and all-gather run as one reduce / broadcast per rank instead of
    the flat collectives: on gloo, which stages its flat forms through copies of the whole
    buffer (runtime/comm.py)."""
    return backend == "gloo"


IN_PLACE_MIN = 1 << 20
"""Elements from which a rank-major tensor is all-gathered into its own storage where the
collectives run per rank (`publish_gathers`): each such gather is one more call per rank, and
on gloo a call costs about what copying a few MiB does, so smaller tensors share a bucket's one
call and its copy back (bench/results/publish_in_place-*.md measures both ways)."""


def rank_major(numel: int, world: int) -> bool:
    """Whether a whole tensor of `numel` elements, viewed as [world, numel / world], is its
    ranks' chunks in rank order: sharded over more than one rank and needing no padding."""
    return world > 1 and numel % world == 0


def gathers_in_place(numel: int, *, world: int, per_rank: bool) -> bool:
    """Whether publishing all-gathers a tensor of `numel` elements into its own storage."""
    return per_rank and numel >= IN_PLACE_MIN and rank_major(numel, world)


class Gather(NamedTuple):
    """One all-gather of `publish_gathers`: tensors [start, end), into the tensor's own
    storage (`in_place`, then exactly one tensor) or through a buffer copied back from."""

    start: int
    end: int
    in_place: bool


def publish_gathers(numels: Sequence[int], ranges: Sequence[tuple[int, int]], *, world: int,
                    per_rank: bool) -> list[Gather]:
    """The all-gathers that publish the tensors of `ranges` (all-gather buckets, in order)
    after the step. A bucket goes in one call, through a buffer its result is copied back
    from. Where the collectives run `per_rank` (gloo: an all-gather is one broadcast per rank),
    a large rank-major tensor (`gathers_in_place`) is gathered on its own instead, into its own
    storage, all such gathers in flight at once: no buffer to fault in and no copy back
    (runtime/zero/base.py `gather_into_model`); the tensors of the bucket between them keep one
    call per run."""
    out: list[Gather] = []
    for start, end in ranges:
        run = start
        for i in range(start, end):
            if gathers_in_place(numels[i], world=world, per_rank=per_rank):
                out += [Gather(run, i, False)] if run < i else []
                out.append(Gather(i, i + 1, True))
                run = i + 1
        if run < end:
            out.append(Gather(run, end, False))
    return out


def reduces_in_place(*, stage: int, reduce_bytes: int) -> bool:
    """Whether gradient buckets are reduced where the gradients already lie, with no bucket
    buffer: at stage 0 every rank keeps the whole gradient in one flat fp32 buffer, laid out as
    the buckets are, so a reduction in fp32 (4-byte elements) runs on it directly; any other
    stage or reduce dtype packs each bucket into a buffer of its own."""
    return stage == 0 and reduce_bytes == 4


def gradient_stage(*, stage: int, accumulation: int) -> int:
    """The stage whose gradient path runs: stage 1 with one micro-batch per step has nothing to
    accumulate, so it reduce-scatters straight from the gradients as stage 2 does
    (zero/stage12.py's `Stage1Direct`); its optimizer state and publish stay stage 1's."""
    return 2 if stage == 1 and accumulation == 1 else stage


def params_view_master(*, stage: int, param_bytes: int) -> bool:
    """Whether the parameters are views of the flat fp32 master (stage 0 training in fp32,
    zero/stage0.py): nothing is copied into them after the step, and they cost no memory beside it."""
    return stage == 0 and param_bytes == 4
