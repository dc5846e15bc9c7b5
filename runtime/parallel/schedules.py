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
Both have the same bubble: (pp - 1) forward+backward slots of idle time per stage in a step
of m + pp - 1 slots, a fraction (pp - 1) / (m + pp - 1) (the compiler's cost model adds
(pp - 1) / m of the compute, the same time).

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

SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class Action:
    kind: str
    mb: int

    def __repr__(self) -> str:
        return f"{self.kind}({self.mb})"


def _forward(mb: int, *, stage: int, stages: int) -> list[Action]:
    out = [Action(RECV_FORWARD, mb)] if stage > 0 else []
    out.append(Action(FORWARD, mb))
    if stage < stages - 1:
        out.append(Action(SEND_FORWARD, mb))
    return out


def _backward(mb: int, *, stage: int, stages: int) -> list[Action]:
    out = [Action(RECV_BACKWARD, mb)] if stage < stages - 1 else []
    out.append(Action(BACKWARD, mb))
    if stage > 0:
        out.append(Action(SEND_BACKWARD, mb))
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


def build_schedule(name: str, *, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """The actions of `stage` for schedule `name` ('1f1b' or 'gpipe')."""
    if name == "1f1b":
        return one_f_one_b(stage=stage, stages=stages, micro_batches=micro_batches)
    if name == "gpipe":
        return gpipe(stage=stage, stages=stages, micro_batches=micro_batches)
    raise ValueError(f"pipeline schedule {name!r} is none of {SCHEDULES}")


def max_in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose forward ran and whose backward has not (activations held)."""
    alive, most = 0, 0
    for a in actions:
        if a.kind == FORWARD:
            alive += 1
            most = max(most, alive)
        elif a.kind == BACKWARD:
            alive -= 1
    return most


def simulate(schedules: list[list[Action]]) -> list[tuple[int, Action]]:
    """Run every stage's actions with buffered sends and blocking receives; the global order.

    Raises RuntimeError naming the stuck actions if the stages deadlock, or if a receive
    would get another micro-batch than the one the peer sent first (messages are FIFO).
    """
    sent: dict[tuple[int, str], list[int]] = {}
    pos = [0] * len(schedules)
    order: list[tuple[int, Action]] = []
    source = {RECV_FORWARD: (-1, SEND_FORWARD), RECV_BACKWARD: (1, SEND_BACKWARD)}
    while any(p < len(s) for p, s in zip(pos, schedules)):
        moved = False
        for stage, actions in enumerate(schedules):
            while pos[stage] < len(actions):
                a = actions[pos[stage]]
                if a.kind in source:
                    offset, kind = source[a.kind]
                    queue = sent.get((stage + offset, kind), [])
                    if not queue:
                        break
                    got = queue.pop(0)
                    if got != a.mb:
                        raise RuntimeError(f"stage {stage} {a} received micro-batch {got}")
                elif a.kind in (SEND_FORWARD, SEND_BACKWARD):
                    sent.setdefault((stage, a.kind), []).append(a.mb)
                order.append((stage, a))
                pos[stage] += 1
                moved = True
        if not moved:
            stuck = {s: actions[pos[s]] for s, actions in enumerate(schedules) if pos[s] < len(actions)}
            raise RuntimeError(f"pipeline deadlock: stages wait at {stuck}")
    return order


def _check(*, stage: int, stages: int, micro_batches: int) -> None:
    if stages < 1 or not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside a pipeline of {stages} stages")
    if micro_batches < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch, got {micro_batches}")
