"""Point-to-point communication between adjacent pipeline stages, and the tied-weight groups.

`PipeComm` moves one tensor per micro-batch along this rank's pp group:
  forward:  send_forward(t, mb) on stage s   -> recv_forward(mb) on stage s + 1
  backward: send_backward(g, mb) on stage s  -> recv_backward(mb, like=output) on stage s - 1
Sends are asynchronous (`isend`; the tensor is kept alive until `wait_sends`, called before
the optimizer step) and receives block, the contract schedules.simulate checks the schedules
against. Each message has its own tag (micro-batch and direction), so matching never depends
on the order two messages travel in.

Shapes: an activation's shape and dtype are not known to the next stage in advance (a user's
`nn.Sequential` may change them, and micro-batches of one step may differ in length), so each
forward message is preceded by a fixed-size int64 header (dtype code, ndim, dims; its size is
the compiler's, compiler/comm.py, which counts it). A gradient has its output's shape, which
the receiver holds: no header.

On gloo (torch 2.13, CPU) `isend`/`irecv` between any two ranks of a subgroup work, with
global ranks as peers; `batch_isend_irecv` works as well but adds nothing here since sends
never block. NCCL takes the same calls.

Tied parameters (the GPT's embedding, on the first and last stage): `tied_groups` builds one
group per set of stages sharing a parameter, for every (dp, tp) coordinate (Megatron's
embedding group); `sum_tied` all-reduces each tied parameter's gradient shard slice over it.

Everything here is logged as `pp.<op>` (`pp.send`, `pp.recv`, `pp.all_reduce`) beside the dp
group's collectives, as tensor parallelism's are as `tp.<op>`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zeroplan.compiler.comm import PIPE_HEADER_ELEMENTS, PIPE_MAX_DIMS

from ..comm import Collectives, CommsLogger
from .tensor_comm import PrefixedLogger
from .topology import Topology

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
_FORWARD, _HEADER, _BACKWARD = 0, 1, 2


class PipeComm:
    """Sends and receives of one stage to and from its neighbours in the pp group."""

    def __init__(self, *, group: dist.ProcessGroup, stage: int, stages: int, device: torch.device,
                 logger: CommsLogger):
        self.group, self.stage, self.stages, self.device = group, stage, stages, device
        self.logger = pp_logger(logger)
        self.prev = dist.get_global_rank(group, stage - 1) if stage > 0 else None
        self.next = dist.get_global_rank(group, stage + 1) if stage < stages - 1 else None
        self._pending: list[tuple[object, torch.Tensor]] = []

    @staticmethod
    def _tag(mb: int, kind: int) -> int:
        return 3 * mb + kind

    def _isend(self, tensor: torch.Tensor, *, dst: int, tag: int) -> None:
        self.logger.record("send", tensor)
        self._pending.append((dist.isend(tensor, dst=dst, group=self.group, tag=tag), tensor))

    def _recv(self, tensor: torch.Tensor, *, src: int, tag: int) -> torch.Tensor:
        self.logger.record("recv", tensor)
        dist.recv(tensor, src=src, group=self.group, tag=tag)
        return tensor

    def send_forward(self, activation: torch.Tensor, mb: int) -> None:
        t = activation.detach().contiguous()
        if t.dim() > PIPE_MAX_DIMS or t.dtype not in DTYPES:
            raise TypeError(f"a pipeline stage must pass one tensor of at most {PIPE_MAX_DIMS} dims and a dtype in "
                            f"{DTYPES}; got {t.dtype} of shape {tuple(t.shape)}")
        header = torch.zeros(PIPE_HEADER_ELEMENTS, dtype=torch.int64)
        header[0], header[1] = DTYPES.index(t.dtype), t.dim()
        header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        self._isend(header.to(self.device), dst=self.next, tag=self._tag(mb, _HEADER))
        self._isend(t, dst=self.next, tag=self._tag(mb, _FORWARD))

    def recv_forward(self, mb: int) -> torch.Tensor:
        """The previous stage's output for micro-batch mb (a fresh tensor, no grad yet)."""
        header = self._recv(torch.empty(PIPE_HEADER_ELEMENTS, dtype=torch.int64, device=self.device),
                            src=self.prev, tag=self._tag(mb, _HEADER)).tolist()
        dtype, ndim = DTYPES[header[0]], header[1]
        out = torch.empty(header[2:2 + ndim], dtype=dtype, device=self.device)
        return self._recv(out, src=self.prev, tag=self._tag(mb, _FORWARD))

    def send_backward(self, grad: torch.Tensor, mb: int) -> None:
        self._isend(grad.detach().contiguous(), dst=self.prev, tag=self._tag(mb, _BACKWARD))

    def recv_backward(self, mb: int, *, like: torch.Tensor) -> torch.Tensor:
        """The gradient of this stage's output `like` for micro-batch mb."""
        return self._recv(torch.empty_like(like, memory_format=torch.contiguous_format), src=self.next,
                          tag=self._tag(mb, _BACKWARD))

    def wait_sends(self) -> None:
        for work, _tensor in self._pending:
            work.wait()
        self._pending.clear()


def pp_logger(logger: CommsLogger) -> PrefixedLogger:
    """`logger` recording as "pp.<op>"."""
    return PrefixedLogger(logger, "pp")


def pp_collectives(*, group: dist.ProcessGroup, logger: CommsLogger) -> Collectives:
    """Collectives over the pp group (the norm's, the overflow flag's and the loss's sums), logged as "pp.<op>"."""
    return Collectives(group=group, logger=pp_logger(logger))


def tied_groups(*, topology: Topology, stage_sets: list[tuple[int, ...]],
                rank: int) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """This rank's group for each stage set it belongs to (a collective: every rank calls it,
    creating every group of every set in the same order)."""
    here = topology.coords(rank)
    mine = {}
    for stages in stage_sets:
        for dp in range(topology.dp):
            for tp in range(topology.tp):
                ranks = [topology.rank_of(pp=s, dp=dp, tp=tp) for s in stages]
                group = dist.new_group(ranks)
                if here["dp"] == dp and here["tp"] == tp and here["pp"] in stages:
                    mine[stages] = group
    return mine


def sum_tied(grad: torch.Tensor, *, spans: list[tuple[int, int, dist.ProcessGroup]], logger: CommsLogger) -> None:
    """Sum each (offset, length) slice of the (fp32) gradient shard over its group, in place;
    logged as "pp.all_reduce"."""
    for offset, length, group in spans:
        part = grad[offset:offset + length]
        pp_logger(logger).record("all_reduce", part)
        dist.all_reduce(part, group=group)
