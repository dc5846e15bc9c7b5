"""Every rank's verdict on one phase of a collective operation, known to every rank.

A phase that can fail on one rank alone (a damaged shard, a full disk) must not leave the
others waiting in the next collective: each rank finishes the phase, then
  1: one all-reduce (MAX) of this rank's failed flag over the world;
  2: only when some rank failed, one all_gather_object of the reasons,
so every rank returns the same list of (rank, reason) and its caller raises the same error
everywhere. A rank that dies outright is the process group's timeout to catch, not this.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zeroplan.schemas import ConfigError


class Agreement:
    """Verdicts over the default (world) group; `device` is where the flag tensor lives
    (NCCL needs it on the rank's GPU)."""

    def __init__(self, *, device: torch.device):
        self.device = device

    def failures(self, error: BaseException | None) -> list[tuple[int, str]]:
        """(rank, reason) of every rank whose phase failed, in rank order; empty when none did."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return []
        reasons: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, None if error is None else reason_of(error))
        return [(rank, reason) for rank, reason in enumerate(reasons) if reason is not None]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out


def reason_of(error: BaseException) -> str:
    """One line per problem of a ConfigError; otherwise the exception's type and text."""
    if isinstance(error, ConfigError):
        return "; ".join(p.render() for p in error.problems)
    return f"{type(error).__name__}: {error}"


def by_reason(failures: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """("rank 1" or "ranks 0, 1", reason): ranks that failed for the same reason, together."""
    ranks: dict[str, list[int]] = {}
    for rank, reason in failures:
        ranks.setdefault(reason, []).append(rank)
    return [(("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs)), reason) for reason, rs in ranks.items()]


__all__ = ["Agreement", "by_reason", "reason_of"]
