"""The pipeline-parallel Engine: one stage of the model per pp rank, ZeRO 0-2 over its dp group.

    engine = zeroplan.initialize(model, plan=plan)     # plan.parallel.pp > 1
    loss = engine.train_batch(data_iter)               # one optimizer step, as DeepSpeed's PipelineEngine

A step (`train_batch`):
  1. every stage reads the same m = gradient_accumulation_steps micro-batches from its
     iterator (the first stage uses the inputs, the last the labels, see `split_batch`);
  2. the stage runs its schedule (pipeline_schedules.py: 1F1B or GPipe): forwards and backwards of its
     layers, activations and their gradients passed to the neighbours (pipeline_comm.py). The
     last stage computes the loss and backpropagates it scaled by loss_scale / m. Around each
     backward the ZeRO stage reduces gradients over the dp group as in the plain Engine, the
     last backward being the accumulation boundary;
  3. the gradients of tied parameters (the GPT's embedding on the first and last stage) are
     summed over their stages, so both copies take the same step;
  4. the plain Engine's optimizer step: fp16 overflow skips the step on every rank of the world
     (the flag agreed in one all-reduce over the world); the global gradient norm sums the squared shard
     norms over dp and pp, counting a tied parameter once; clip, step, publish;
  5. the mean loss of the m micro-batches is broadcast from the last stage to the pp group, so
     every rank returns it.

torch.distributed.pipelining (PipelineStage with ScheduleGPipe / Schedule1F1B) does run on
gloo with CPU tensors in torch 2.13 (checked with a two-stage nn.Sequential), but its
schedules run backward themselves and offer no point between micro-batches at which the ZeRO
stages can open and close a backward (begin_backward / end_backward with the accumulation
boundary) or see that the step is over, so this small executor runs the schedules instead.

Every pp message and collective of a step is logged as `pp.<op>`; compiler/comm.py's
`_pp_collectives` predicts them, and a contract test holds the two equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..dist import ProcessGroups
from ..batches import cast_floats, count_tokens
from ..engine import Engine
from .pipeline import PipelineStage, split_model, tied_stage_sets
from .pipeline_comm import PipeComm, pp_collectives, sum_tied, tied_groups
from .pipeline_schedules import (BACKWARD, FORWARD, RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD,
                                 pipeline_actions)


@dataclass
class StageSetup:
    """What `initialize` builds for a pipeline rank besides the Engine's usual parts."""

    module: PipelineStage
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """The last stage's loss(output, labels); it holds no reference to other stages' layers."""
    tied: dict[tuple[int, ...], dist.ProcessGroup]


def build_stage(model: nn.Module, *, groups: ProcessGroups, method: str) -> StageSetup:
    """Cut `model` into groups.pp_size stages and keep this rank's (a collective: the tied
    groups are created on every rank)."""
    pp = groups.pp_size
    stage_sets = tied_stage_sets(model, stages=pp, method=method)
    module, loss_fn = split_model(model, stage=groups.pp_rank, stages=pp, method=method)
    return StageSetup(module=module, loss_fn=loss_fn,
                      tied=tied_groups(topology=groups.topology, stage_sets=stage_sets, rank=groups.rank))


def split_batch(batch) -> tuple[object, torch.Tensor | None]:
    """(inputs, labels) of a micro-batch: a mapping with 'labels' and one other key, or a pair."""
    if isinstance(batch, Mapping):
        rest = [k for k in batch if k != "labels"]
        if "labels" in batch and len(rest) == 1:
            return batch[rest[0]], batch["labels"]
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError("a pipeline micro-batch is a dict with 'labels' and one input (e.g. {'input_ids', 'labels'}) "
                    f"or an (inputs, labels) pair; got {type(batch).__name__}"
                    f"{sorted(batch) if isinstance(batch, Mapping) else ''}")


class PipelineEngine(Engine):
    """Built by `initialize` when plan.parallel.pp > 1; `__init__` only stores."""

    def __init__(self, *, pipe_stage: StageSetup, **kwargs):
        super().__init__(**kwargs)
        self.stage = pipe_stage.module
        self.pp_coll = pp_collectives(group=self.groups.pp_group, logger=self.coll.logger)
        self.pipe = PipeComm(coll=self.pp_coll, stage=self.stage.stage, stages=self.stage.stages, device=self.device)
        self.loss_fn = pipe_stage.loss_fn
        self.tied_spans, self._uncounted = self._tied_spans(pipe_stage.tied)
        self.actions = pipeline_actions(self.plan.parallel.pipeline_schedule, stage=self.stage.stage,
                                        stages=self.stage.stages, micro_batches=self.plan.parallel.pipeline_micro_batches)
        self.max_in_flight = 0
        """The most micro-batches whose activations this stage held at once in the last step."""

    def _tied_spans(self, groups: dict[tuple[int, ...], dist.ProcessGroup]) -> tuple[list, set[int]]:
        """(offset, length, the tied group's Collectives) of each tied parameter's shard slice;
        the slots this stage leaves out of the gradient norm."""
        spans, uncounted = [], set()
        colls = {stages: pp_collectives(group=group, logger=self.coll.logger) for stages, group in groups.items()}
        for tied in self.stage.tied:
            slot = self.zero.layout.slots[self.zero.layout.index_of(self.stage.get_parameter(tied.local_name))]
            spans.append((slot.offset, slot.chunk, colls[tied.stages]))
            if tied.stages[0] != self.stage.stage:
                uncounted.add(slot.index)
        return spans, uncounted

    # -- the DeepSpeed-style loop is train_batch only ---------------------------------------------
    def _refuse(self, *args, **kwargs):
        raise RuntimeError("a pipeline-parallel engine (pp > 1) runs whole steps: call "
                           "engine.train_batch(data_iter) instead of engine(batch), backward() and step()")

    __call__ = forward = backward = step = _refuse

    def train_batch(self, data_iter: Iterator) -> torch.Tensor:
        """One optimizer step over m micro-batches from `data_iter`; the mean loss on every stage."""
        self.meter.begin()
        self.coll.logger.reset()
        m = self.accumulation
        batches = [split_batch(next(data_iter)) for _ in range(m)]
        for inputs, _labels in batches:
            self.meter.count_tokens(count_tokens(inputs) * self.groups.dp_size)
        with self._timed("schedule"):
            losses = self._run_schedule(batches)
            self.pipe.wait_sends()
        with self._timed("step"):
            self._optimizer_step()
        self.global_steps += 1
        self.micro_steps += m
        self.meter.end()
        self.last_comms = self.coll.logger.snapshot()
        loss = self._broadcast_loss(losses)
        self._after_step(loss)
        return loss

    def _run_schedule(self, batches: list) -> list[torch.Tensor]:
        stage, m = self.stage, self.accumulation
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        out_grads: dict[int, torch.Tensor] = {}
        losses, backwards = [], 0
        self.max_in_flight = 0
        for action in self.actions:
            kind, mb = action.kind, action.mb
            if kind == RECV_FORWARD:
                inputs[mb] = self.pipe.recv_forward(mb).requires_grad_(True)
            elif kind == FORWARD:
                x = inputs.setdefault(mb, cast_floats(batches[mb][0], self.param_dtype))
                out = stage(x)
                if stage.is_last:
                    out = self.loss_fn(out, batches[mb][1])
                    losses.append(out.detach().float())
                outputs[mb] = out
                self.max_in_flight = max(self.max_in_flight, len(outputs))
            elif kind == SEND_FORWARD:
                self.pipe.send_forward(outputs[mb], mb)
            elif kind == RECV_BACKWARD:
                out_grads[mb] = self.pipe.recv_backward(mb, like=outputs[mb])
            elif kind == BACKWARD:
                backwards += 1
                self._backward(outputs.pop(mb), out_grads.pop(mb, None), boundary=backwards == m)
            elif kind == SEND_BACKWARD:
                self.pipe.send_backward(inputs.pop(mb).grad, mb)
        return losses

    def _backward(self, output: torch.Tensor, grad: torch.Tensor | None, *, boundary: bool) -> None:
        self.zero.begin_backward(boundary=boundary)
        if grad is None:  # the last stage: output is the micro-batch's loss
            (output.float() * (self.scaler.loss_scale / self.accumulation)).backward()
        else:
            torch.autograd.backward(output, grad_tensors=grad)
        self.zero.end_backward()

    def _broadcast_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        loss = torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float32, device=self.device)
        self.pp_coll.broadcast(loss, src=self.stage.stages - 1)  # after the step's snapshot: not in its comms
        return loss

    # -- the optimizer step: the Engine's, with the pipeline's reductions ---------------------------
    def _optimizer_step(self) -> None:
        if self.tied_spans:
            sum_tied(self.zero.grad, spans=self.tied_spans)
        super()._optimizer_step()

    def _counts_in_norm(self, index: int) -> bool:
        """A tied parameter's copies hold the same summed gradient: only its first stage counts it."""
        return index not in self._uncounted

    def _grad_sq(self) -> torch.Tensor:
        """The Engine's squared norm over dp and tp (this stage's parameters), summed over pp."""
        return self.pp_coll.sum_scalar(super()._grad_sq())

    # -- state ----------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's whole state_dict in fp32, on every rank (a collective over the world:
        each stage gathers its shards over dp, then the stages exchange theirs over pp)."""
        mine = {self.stage.plain_names[k]: v for k, v in super().full_state_dict().items()}
        out: dict[str, torch.Tensor] = {}
        for part in self.pp_coll.all_gather_object(mine):
            out.update(part)
        return out

    def close(self) -> None:
        """The Engine's close; drop the pipeline's group references too (see ProcessGroups.close)."""
        super().close()
        self.pp_coll.close()
        for _offset, _length, coll in self.tied_spans:
            coll.close()
        self.tied_spans = []
