"""Pipeline schedules as data: the ordered actions one stage runs for one optimizer step.

A schedule is a list of `Action(kind, micro_batch)` per stage; the engine's executor
(pipeline_engine.py) runs it, and the tests read it: action order, micro-batches alive at
once, and (by simulation) that the stages' sends and receives always match up.

- GPipe (Huang et al. 2019): every forward, then every backward; a stage keeps the
  activations of all m micro-batches until its backwards start.
- 1F1B, non-interleaved (PipeDream-Flush; Narayanan et al. 2021, "Efficient Large-Scale
  Language Model Training on GPU Clusters Using Megatron-LM", section 2.2): stage s runs
  min(pp - s - 1, m) warm-up forwards, then alternates one forward and one backward, then
  drains the remaining backwards; it holds at most min(pp - s, m) micro-batches' activations.
- Interleaved 1F1B (Narayanan et al. 2021, section 2.2.2; Megatron-LM's
  `forward_backward_pipelining_with_interleaving`): each rank holds v model chunks (virtual
  stages), chunk c of rank r being model stage c * pp + r, so a micro-batch passes every rank v
  times and the last rank hands chunk c's output to rank 0's chunk c + 1. Forwards run in
  groups of pp micro-batches per chunk (chunks 0..v-1, then the next pp micro-batches),
  backwards in the same groups with the chunks reversed; rank r warms up with
  2 (pp - r - 1) + (v - 1) pp chunk-forwards (every one when m = pp), then alternates. The
  micro-batch count must be a multiple of pp, as Megatron asserts.
GPipe and 1F1B have the same bubble: (pp - 1) forward+backward slots of idle time per stage in a
step of m + pp - 1 slots, a fraction (pp - 1) / (m + pp - 1) (the compiler's cost model adds
(pp - 1) / m of the compute, the same time). Interleaving divides it by v: each slot is a
chunk's, 1/v of the rank's work, so the idle time is (pp - 1) / (v m) of the compute, for v
times as many point-to-point messages (`makespan` measures it).

Sends are asynchronous and receives block (pipeline_comm.py), the contract `simulate`
checks: no stage waits for a message its peer sends only after waiting on it.
"""

from __future__ import annotations

from dataclasses import dataclass

RECV_FORWARD = "recv_forward"
"""Receive micro-batch mb's input activation from the previous stage."""
FORWARD = "forward"
SEND_FORWARD = "send_forward"
"""Send micro-batch mb's output activation to the next stage."""
RECV_BACKWARD = "recv_backward"
"""Receive the gradient of micro-batch mb's output from the next stage."""
BACKWARD = "backward"
SEND_BACKWARD = "send_backward"
"""Send the gradient of micro-batch mb's input to the previous stage."""

SCHEDULES = ("1f1b", "gpipe", "interleaved")


@dataclass(frozen=True)
class Action:
    kind: str
    mb: int
    chunk: int = 0
    """Which of the rank's model chunks runs it (0 unless interleaved)."""

    def __repr__(self) -> str:
        return f"{self.kind}({self.mb})" if self.chunk == 0 else f"{self.kind}({self.mb}, chunk {self.chunk})"


def _forward(mb: int, *, stage: int, stages: int, chunk: int = 0, chunks: int = 1) -> list[Action]:
    """Receive (but on the model's first stage), run, send (but on its last): model stage
    chunk * stages + stage."""
    model_stage, last = chunk * stages + stage, stages * chunks - 1
    out = [Action(RECV_FORWARD, mb, chunk)] if model_stage > 0 else []
    out.append(Action(FORWARD, mb, chunk))
    if model_stage < last:
        out.append(Action(SEND_FORWARD, mb, chunk))
    return out


def _backward(mb: int, *, stage: int, stages: int, chunk: int = 0, chunks: int = 1) -> list[Action]:
    model_stage, last = chunk * stages + stage, stages * chunks - 1
    out = [Action(RECV_BACKWARD, mb, chunk)] if model_stage < last else []
    out.append(Action(BACKWARD, mb, chunk))
    if model_stage > 0:
        out.append(Action(SEND_BACKWARD, mb, chunk))
    return out


def gpipe(*, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """All forwards in micro-batch order, then all backwards in the same order."""
    _check(stage=stage, stages=stages, micro_batches=micro_batches)
    out: list[Action] = []
    for mb in range(micro_batches):
        out += _forward(mb, stage=stage, stages=stages)
    for mb in range(micro_batches):
        out += _backward(mb, stage=stage, stages=stages)
    return out


def one_f_one_b(*, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """Warm-up forwards, then one forward and one backward at a time, then the last backwards."""
    _check(stage=stage, stages=stages, micro_batches=micro_batches)
    warmup = min(stages - stage - 1, micro_batches)
    out: list[Action] = []
    for mb in range(warmup):
        out += _forward(mb, stage=stage, stages=stages)
    for i in range(micro_batches - warmup):
        out += _forward(warmup + i, stage=stage, stages=stages)
        out += _backward(i, stage=stage, stages=stages)
    for mb in range(micro_batches - warmup, micro_batches):
        out += _backward(mb, stage=stage, stages=stages)
    return out


def _chunk_order(k: int, *, stages: int, chunks: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of a rank's k-th forward (or backward) in the interleaved order:
    groups of `stages` micro-batches, each group through chunk 0..v-1 (backward: v-1..0)."""
    group, within = divmod(k, stages * chunks)
    chunk = within // stages
    return group * stages + within % stages, chunk if forward else chunks - 1 - chunk


def interleaved(*, stage: int, stages: int, micro_batches: int, chunks: int) -> list[Action]:
    """Interleaved 1F1B over `chunks` model chunks per rank (see the module docstring)."""
    _check(stage=stage, stages=stages, micro_batches=micro_batches)
    check_interleaved(stages=stages, micro_batches=micro_batches, chunks=chunks)
    total = micro_batches * chunks
    warmup = total if micro_batches == stages else min(2 * (stages - stage - 1) + (chunks - 1) * stages, total)
    shape = dict(stage=stage, stages=stages, chunks=chunks)

    def fwd(k: int) -> list[Action]:
        mb, chunk = _chunk_order(k, stages=stages, chunks=chunks, forward=True)
        return _forward(mb, chunk=chunk, **shape)

    def bwd(k: int) -> list[Action]:
        mb, chunk = _chunk_order(k, stages=stages, chunks=chunks, forward=False)
        return _backward(mb, chunk=chunk, **shape)

    out = [a for k in range(warmup) for a in fwd(k)]
    for k in range(total - warmup):
        out += fwd(warmup + k) + bwd(k)
    for k in range(total - warmup, total):
        out += bwd(k)
    return out


def check_interleaved(*, stages: int, micro_batches: int, chunks: int) -> None:
    """ValueError unless the interleaved schedule can run: at least 2 chunks per rank, a
    pipeline (stages > 1), and a micro-batch count that is a multiple of the stages."""
    if chunks < 2:
        raise ValueError(f"the interleaved schedule needs at least 2 model chunks per stage, got {chunks}")
    if stages < 2:
        raise ValueError("the interleaved schedule needs a pipeline of at least 2 stages")
    if micro_batches % stages:
        raise ValueError(f"the interleaved schedule needs micro-batches({micro_batches}) to be a multiple of "
                         f"the pipeline stages({stages})")


def pipeline_actions(name: str, *, stage: int, stages: int, micro_batches: int, chunks: int = 1) -> list[Action]:
    """The actions of `stage` for schedule `name` ('1f1b', 'gpipe', or 'interleaved' over
    `chunks` model chunks per stage)."""
    if name == "1f1b":
        return one_f_one_b(stage=stage, stages=stages, micro_batches=micro_batches)
    if name == "gpipe":
        return gpipe(stage=stage, stages=stages, micro_batches=micro_batches)
    if name == "interleaved":
        return interleaved(stage=stage, stages=stages, micro_batches=micro_batches, chunks=chunks)
    raise ValueError(f"pipeline schedule {name!r} is none of {SCHEDULES}")


def max_in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose forward ran and whose backward has not (activations held);
    interleaved, the most (micro-batch, chunk) pairs, each holding one chunk's activations."""
    alive, most = 0, 0
    for a in actions:
        if a.kind == FORWARD:
            alive += 1
            most = max(most, alive)
        elif a.kind == BACKWARD:
            alive -= 1
    return most


def _peer(stage: int, a: Action, *, stages: int) -> tuple[int, str, tuple[int, int]]:
    """(rank, send kind, (micro-batch, model stage)) of the message a receive waits for."""
    model_stage = a.chunk * stages + stage
    source = model_stage - 1 if a.kind == RECV_FORWARD else model_stage + 1
    return source % stages, SEND_FORWARD if a.kind == RECV_FORWARD else SEND_BACKWARD, (a.mb, source)


def simulate(schedules: list[list[Action]]) -> list[tuple[int, Action]]:
    """Run every stage's actions with buffered sends and blocking receives; the global order.

    A message goes from model stage k to k + 1 (forward) or k - 1 (backward); model stage k is
    chunk k // pp of rank k % pp. Raises RuntimeError naming the stuck actions if the stages
    deadlock, or if a receive would get another micro-batch or chunk than the one the peer
    sent first (messages between two ranks are FIFO).
    """
    stages = len(schedules)
    sent: dict[tuple[int, str], list[tuple[int, int]]] = {}
    pos = [0] * stages
    order: list[tuple[int, Action]] = []
    while any(p < len(s) for p, s in zip(pos, schedules)):
        moved = False
        for stage, actions in enumerate(schedules):
            while pos[stage] < len(actions):
                a = actions[pos[stage]]
                if a.kind in (RECV_FORWARD, RECV_BACKWARD):
                    peer, kind, want = _peer(stage, a, stages=stages)
                    queue = sent.get((peer, kind), [])
                    if not queue:
                        break
                    got = queue.pop(0)
                    if got != want:
                        raise RuntimeError(f"stage {stage} {a} received micro-batch {got[0]} of model stage {got[1]}")
                elif a.kind in (SEND_FORWARD, SEND_BACKWARD):
                    sent.setdefault((stage, a.kind), []).append((a.mb, a.chunk * stages + stage))
                order.append((stage, a))
                pos[stage] += 1
                moved = True
        if not moved:
            stuck = {s: actions[pos[s]] for s, actions in enumerate(schedules) if pos[s] < len(actions)}
            raise RuntimeError(f"pipeline deadlock: stages wait at {stuck}")
    return order


def makespan(schedules: list[list[Action]], *, forward: float, backward: float) -> float:
    """Time from the first forward to the last backward when a chunk's forward takes `forward`
    and its backward `backward`, messages arrive at once, and a rank runs its actions in order,
    each as soon as its input has arrived (the schedule's bubble, without communication)."""
    stages = len(schedules)
    clock = [0.0] * stages
    done: dict[tuple[str, int, int], float] = {}  # (send kind, micro-batch, model stage) -> when sent
    for stage, a in simulate(schedules):
        model_stage = a.chunk * stages + stage
        if a.kind in (RECV_FORWARD, RECV_BACKWARD):
            _, kind, (mb, source) = _peer(stage, a, stages=stages)
            clock[stage] = max(clock[stage], done[(kind, mb, source)])
        elif a.kind in (SEND_FORWARD, SEND_BACKWARD):
            done[(a.kind, a.mb, model_stage)] = clock[stage]
        else:
            clock[stage] += forward if a.kind == FORWARD else backward
    return max(clock)


def _check(*, stage: int, stages: int, micro_batches: int) -> None:
    if stages < 1 or not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside a pipeline of {stages} stages")
    if micro_batches < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch, got {micro_batches}")
