"""Point-to-point communication between adjacent pipeline stages, and the tied-weight groups.

`PipeComm` moves one tensor per micro-batch along this rank's pp group:
  forward:  send_forward(t, mb) on stage s   -> recv_forward(mb) on stage s + 1
  backward: send_backward(g, mb) on stage s  -> recv_backward(mb, like=output) on stage s - 1
Sends are asynchronous (`isend`; the tensor is kept alive until `wait_sends`, called before
the optimizer step) and receives block, the contract pipeline_schedules.simulate checks the
schedules against. Each message has its own tag (micro-batch and direction), so matching never depends
on the order two messages travel in.

Shapes: an activation's shape and dtype are not known to the next stage in advance (a user's
`nn.Sequential` may change them, and micro-batches of one step may differ in length), so each
forward message is preceded by a fixed-size int64 header (dtype code, ndim, dims; its size is
the compiler's, compiler/comm.py, which counts it). A gradient has its output's shape, which
the receiver holds: no header.

The messages go through the pp group's logged Collectives (`send`, `recv`; runtime/comm.py).
On gloo (torch 2.13, CPU) `isend`/`recv` between any two ranks of a subgroup work, with global
ranks as peers; `batch_isend_irecv` works as well but adds nothing here since sends never
block. NCCL takes the same calls.

Tied parameters (the GPT's embedding, on the first and last stage): `tied_groups` builds one
group per set of stages sharing a parameter, for every (dp, tp) coordinate (Megatron's
embedding group), and `sum_tied` all-reduces each tied parameter's gradient shard slice over
it through that group's Collectives.

Everything here is logged as `pp.<op>` (`pp.send`, `pp.recv`, `pp.all_reduce`) beside the dp
group's collectives, as tensor parallelism's are as `tp.<op>`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zeroplan.compiler.comm import PIPE_HEADER_ELEMENTS, PIPE_MAX_DIMS

from ..comm import Collectives, CommsLogger, PrefixedLogger
from .topology import Topology

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
_FORWARD, _HEADER, _BACKWARD = 0, 1, 2


class PipeComm:
    """Sends and receives of one stage to and from its neighbours in the pp group (`coll`:
    its Collectives, whose group ranks are the stages)."""

    def __init__(self, *, coll: Collectives, stage: int, stages: int, device: torch.device):
        self.coll, self.stage, self.stages, self.device = coll, stage, stages, device
        self.prev = stage - 1 if stage > 0 else None
        self.next = stage + 1 if stage < stages - 1 else None
        self._pending: list[tuple[object, torch.Tensor]] = []

    @staticmethod
    def _tag(mb: int, kind: int) -> int:
        return 3 * mb + kind

    def _isend(self, tensor: torch.Tensor, *, dst: int, tag: int) -> None:
        self._pending.append((self.coll.send(tensor, dst=dst, tag=tag), tensor))

    def _recv(self, tensor: torch.Tensor, *, src: int, tag: int) -> torch.Tensor:
        return self.coll.recv(tensor, src=src, tag=tag)

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


def pp_collectives(*, group: dist.ProcessGroup, logger: CommsLogger) -> Collectives:
    """Collectives over a pipeline group (the pp group: messages, the norm's sum, the loss's
    broadcast; a tied-parameter group: its gradient's sum), logged as "pp.<op>"."""
    return Collectives(group=group, logger=PrefixedLogger(logger, "pp"))


def tied_groups(*, topology: Topology, stage_sets: list[tuple[int, ...]],
                rank: int) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """This rank's group for each stage set it belongs to (a collective: every rank calls it,
    creating every group of every set in the same order; group creation moves no data and is
    not logged)."""
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


def sum_tied(grad: torch.Tensor, *, spans: list[tuple[int, int, Collectives]]) -> None:
    """Sum each (offset, length) slice of the (fp32) gradient shard over its tied group's
    Collectives (`pp_collectives`: logged as "pp.all_reduce"), in place."""
    for offset, length, coll in spans:
        coll.all_reduce(grad[offset:offset + length])
