"""The Engine: forward, backward and step of one model under a Plan, DeepSpeed's loop.

    for batch in data:
        loss = engine(**batch)      # the model's forward, in the training dtype
        engine.backward(loss)        # scaled by 1/accumulation (and the fp16 loss scale)
        engine.step()                # optimizer step at the accumulation boundary only

A loop that scales its own loss for accumulation (transformers.Trainer does) passes
`engine.backward(loss, scale_wrt_gas=False)`, and one whose windows are not all
`gradient_accumulation_steps` long (an epoch's last, shorter window) says where each ends with
`engine.set_gradient_accumulation_boundary(True/False)` before the backward: DeepSpeed's two
knobs, with its meaning.

Step phases at the boundary: 1. the ZeRO stage has reduced the gradients into each rank's fp32
shard during backward; 2. fp16: an inf/nan on any rank (all_reduce MAX) skips the step on all
and lowers the loss scale; 3. the global gradient norm is all-reduced from the shards' squared
norms, and the shard is unscaled and clipped in one multiply (torch's clip_grad_norm_
coefficient, max_norm / (norm + 1e-6)); 4. the optimizer steps the master shard wherever it lives
(device, host or NVMe: runtime/offload), group by group, leaving the parameters no rank had a
gradient for (param_groups.py); 5. the stage publishes the new weights to the model (all-gather
for stages 1-3); 6. the schedule (or the user's LR scheduler) advances.

`engine(*args, **kwargs)` is `engine.module(*args, **kwargs)` and returns what the model
returns (a Hugging Face model's output object too), as DeepSpeed's engine forwards: a batch
dict is passed as `engine(**batch)`. `engine.train()` / `engine.eval()` set the model's mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from zeroplan.schemas.plan import Plan

from . import engine_checkpoint, export
from .batches import call_model, cast_floats, count_tokens, loss_of
from .comm import Collectives
from .dist import ProcessGroups
from .grad_norm import squared_norm_of_runs
from .metrics import StepMeter, StepReporter, peak_memory
from .monitor import Monitors, StepTimers, log_lines
from .client_optim import BoundGroups
from .offload import MasterOptimizer
from .param_groups import GroupStepper
from .parallel import tp_split_of
from .parallel.sequence_comm import sum_replicated_gradients
from .precision import LossScaler, NonFiniteError
from .schedulers import Schedule
from .zero import ZeroStage


class Engine:
    """Built by `zeroplan.runtime.initialize`; `__init__` only stores."""

    def __init__(self, *, model: nn.Module, plan: Plan, groups: ProcessGroups, coll: Collectives,
                 zero: ZeroStage, optimizer: MasterOptimizer, schedule: Schedule, scaler: LossScaler,
                 param_dtype: torch.dtype, stepper: GroupStepper, param_groups: BoundGroups,
                 world_coll: Collectives, tp_coll: Collectives | None = None):
        self.module, self.plan, self.groups, self.coll = model, plan, groups, coll
        self.world_coll = world_coll
        """Collectives over every rank (`coll` itself when dp is the only dimension): the fp16
        overflow flag is agreed there in one all-reduce (comm.world_collectives)."""
        self.stepper, self._client = stepper, param_groups
        """Groups, gradients received and step counts -> the optimizer's runs; the torch optimizer
        holding the groups and the user's LR scheduler (client_optim.py)."""
        self.tp_coll = tp_coll
        """Collectives over the tp group (None when tp = 1); the tensor-parallel layers hold it too."""
        self.sequence_parallel = plan.parallel.sequence_parallel and tp_coll is not None
        """The tp-replicated parameters saw this rank's part of the sequence: their gradients are
        summed over tp at the step (parallel/sequence.py)."""
        self.zero, self.optimizer, self.schedule, self.scaler = zero, optimizer, schedule, scaler
        self.param_dtype = param_dtype
        self.device = groups.device
        self.accumulation = plan.batch.gradient_accumulation_steps
        self.micro_steps = 0
        self.window_micro_steps = 0
        """Micro-steps since the last optimizer step (0 at a boundary)."""
        self._boundary: bool | None = None
        """set_gradient_accumulation_boundary's value; None: every `accumulation` micro-steps."""
        self._loss_is_share = False
        """The last backward's loss was already the caller's share of the step (scale_wrt_gas=False)."""
        self.global_steps = 0
        self.skipped_steps = 0
        self.nonfinite = plan.precision.nonfinite
        """fp32/bf16: a step whose gradient norm or loss is inf/nan stops the run ("stop": raises
        NonFiniteError on every rank) or is skipped ("skip", as fp16's loss scaler skips)."""
        self.last_grad_norm: float | None = None
        self.last_comms: dict = {}
        self._runs: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None
        self.meter = StepMeter(device=groups.device, global_batch_size=plan.batch.global_batch_size)
        self.reporter: StepReporter | None = None
        """Per-step metrics for the tuner ($ZEROPLAN_METRICS / $ZEROPLAN_MAX_STEPS; set by initialize)."""
        self.checkpointing = None
        """The model's ActivationCheckpointing (runtime/checkpointing.py; set by initialize)."""
        self.monitors = Monitors(backends=[])
        """TensorBoard / CSV / W&B writers of the plan's `monitors` (rank 0; set by initialize)."""
        self.timers = StepTimers(groups.device) if plan.logging.wall_clock_breakdown else None
        """Forward / backward / step time per optimizer step (`logging.wall_clock_breakdown`)."""
        self.print_comms = plan.logging.comms_logger
        """Print the step's collectives every `steps_per_print` steps (DeepSpeed's comms_logger)."""
        self._last_loss: torch.Tensor | None = None
        self.last_lrs: list[float] = []
        """Each param group's learning rate in the last optimizer step."""
        self._micro_losses: list[torch.Tensor] = []

    # -- the loop --------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """The model's forward; floating-point inputs are cast to the training dtype. In eval mode
        nothing is metered: the step's time, tokens and collectives are training's."""
        training = self.module.training
        if training and self.window_micro_steps == 0:
            self.meter.begin()
            self.coll.logger.reset()
        args, kwargs = cast_floats((args, kwargs), self.param_dtype)
        if training:
            self.meter.count_tokens(count_tokens((args, kwargs)) * self.groups.dp_size)
        with self._timed("forward"), self.zero.forward_context():
            return self.module(*args, **kwargs)

    forward = __call__

    def train(self, mode: bool = True) -> "Engine":
        """The model's training mode (dropout, batch-norm statistics), as nn.Module.train."""
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        """The model in eval mode; at ZeRO-3 a forward still gathers each module's parameters."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.module.training

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's param groups, torch's dicts: each group's current lr and hyper-parameters."""
        return self._client.holder.param_groups

    @property
    def lr_scheduler(self):
        """The torch LR scheduler passed to initialize (or built by its callable); None without one."""
        return self._client.scheduler

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next `step()` steps the optimizer: the value set by
        `set_gradient_accumulation_boundary`, else every `gradient_accumulation_steps` micro-steps."""
        if self._boundary is not None:
            return self._boundary
        return self.window_micro_steps + 1 == self.accumulation

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """Say whether the coming backward and step end the accumulation window (DeepSpeed's
        override, kept until changed; None goes back to counting). For loops whose windows are
        not all `gradient_accumulation_steps` long: set it before each micro-step's backward."""
        self._boundary = None if is_boundary is None else bool(is_boundary)

    def backward(self, loss: torch.Tensor, *, scale_wrt_gas: bool = True) -> None:
        """Backward of `loss`, averaged over the accumulation steps; gradients reduced as they come.

        `scale_wrt_gas=False` (DeepSpeed's flag): `loss` is already the caller's share of the
        step's loss and is not divided again; the step's reported loss is then the sum of the
        window's losses rather than their mean."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"backward needs the scalar loss tensor, got {type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
                            + (": pass labels or return the loss (a Hugging Face model's output has loss None "
                               "without labels)" if loss is None else ""))
        self._micro_losses.append(loss.detach().float().reshape(()))
        self._loss_is_share = not scale_wrt_gas
        scale = self.scaler.loss_scale / (self.accumulation if scale_wrt_gas else 1)
        with self._timed("backward"):
            self.zero.begin_backward(boundary=self.is_gradient_accumulation_boundary())
            (loss.float() * scale).backward()
            self.zero.end_backward()

    def step(self) -> None:
        """End a micro-step; at the accumulation boundary, step the optimizer."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        self.window_micro_steps += 1
        if not boundary:
            return
        self.window_micro_steps = 0
        with self._timed("step"):
            self._optimizer_step()
        self.global_steps += 1
        self.meter.end()
        self.last_comms = self.coll.logger.snapshot()
        loss = None
        if self._micro_losses:
            losses = torch.stack(self._micro_losses)
            loss = losses.sum() if self._loss_is_share else losses.mean()
        self._micro_losses.clear()
        self._after_step(loss)

    def _timed(self, phase: str):
        return contextlib.nullcontext() if self.timers is None else self.timers.phase(phase)

    @property
    def last_loss(self) -> float | None:
        """The last optimizer step's loss: the mean over its micro-batches and the dp ranks (the
        last stage's under pipeline parallelism). Reading it waits for the device."""
        return None if self._last_loss is None else float(self._last_loss)

    def _after_step(self, loss: torch.Tensor | None) -> None:
        """The one place a finished optimizer step is reported: the step's loss averaged over
        the dp ranks (one scalar all-reduce, after the step's comms snapshot), the monitors'
        events, then the tuner's line (which ends the run at its last step)."""
        if loss is not None:
            loss = loss.detach().float().reshape(1).clone()
            own = loss.clone()
            self.coll.all_reduce(loss)
            self._last_loss = loss / self.groups.dp_size
            self._check_finite_loss(own)
        timers = self.timers.take_ms() if self.timers is not None else None
        if self.groups.rank == 0 and self.global_steps % self.plan.logging.steps_per_print == 0:
            for line in log_lines(self, timers=timers):
                print(line, flush=True)
        self.monitors.on_step(self, timers=timers)
        if self.reporter is not None:
            self.reporter.on_step(self)

    def _overflow(self) -> bool:
        """An inf/nan in the gradient of any rank: dp, tp and pp ranks hold different gradients,
        and all of them skip the step or none does. One all-reduce over the world."""
        return self.world_coll.any_true(not bool(torch.isfinite(self.zero.grad).all()), device=self.device)

    def _optimizer_step(self) -> None:
        received = self.zero.take_received()
        self.last_lrs = self._group_lrs()
        grad = self.zero.grad
        if self.sequence_parallel:  # the tp-replicated runs (a pipeline's uncounted tied copy is tp-split)
            sum_replicated_gradients(grad, runs=self._norm_runs()[0], coll=self.tp_coll)
        if self.scaler.check_overflow and self._overflow():
            self.skipped_steps += 1
            self.scaler.update_scale(True)
            self.zero.zero_grad()
            return
        inv_scale = 1.0 / self.scaler.loss_scale
        norm = self._grad_norm() * inv_scale
        if not math.isfinite(norm):  # fp32/bf16: fp16's scaler has skipped such a step above
            self._nonfinite_gradients(norm)
            return
        self.last_grad_norm = norm
        coef = inv_scale
        clip = self.plan.optimizer.gradient_clipping
        if clip > 0 and norm + 1e-6 > clip:
            coef *= clip / (norm + 1e-6)
        if coef != 1.0:
            grad.mul_(coef)
        stepped = self.stepper.stepped(received)
        runs, keep = self.stepper.runs(stepped, taken=self.global_steps - self.skipped_steps,
                                       beta1=self.schedule.beta1())
        self.optimizer.step(grad=grad, runs=runs, keep=keep)
        self.stepper.advance(stepped)
        self.zero.publish()
        self.schedule.step()
        self._client.step_scheduler()
        self.scaler.update_scale(False)
        self.zero.zero_grad()

    def _nonfinite_gradients(self, norm: float) -> None:
        """Stop the run (the norm is agreed over the world, so every rank raises), or skip the step."""
        if self.nonfinite == "stop":
            own = torch.stack(self._micro_losses).mean().item() if self._micro_losses else None
            raise NonFiniteError(step=self.global_steps + 1, what="the gradient norm", value=norm, local_loss=own)
        self.skipped_steps += 1
        self.zero.zero_grad()

    def _check_finite_loss(self, own: torch.Tensor) -> None:
        """fp32/bf16, "stop": a non-finite loss (the same on every rank after its all-reduce) ends the run."""
        if self.nonfinite == "stop" and not self.scaler.check_overflow and not math.isfinite(self.last_loss):
            raise NonFiniteError(step=self.global_steps, what="the loss", value=self.last_loss, local_loss=float(own))

    def _grad_norm(self) -> float:
        """Global L2 norm: each rank's squared shard norm, summed over dp ranks, and over tp
        ranks for tensor-parallel parameters only: a parameter replicated on every tp rank
        (a norm, a row-parallel bias) has the same gradient there and counts once. Each
        rank's part is accumulated in float64 (grad_norm.py says why)."""
        return float(self._grad_sq().sqrt().item())

    def _grad_sq(self) -> torch.Tensor:
        """The squared global norm (one fp32 element) over dp and tp; see `_grad_norm`."""
        if self.tp_coll is None:
            sq = squared_norm_of_runs(self.zero.grad, self._norm_runs()[0]).float().reshape(1)
        else:
            sq = torch.stack([squared_norm_of_runs(self.zero.grad, runs) for runs in self._norm_runs()]).float()
        if not self.zero.grad_norm_replicated:
            self.coll.all_reduce(sq)
        if self.tp_coll is not None:
            split = sq[1:].clone()
            self.tp_coll.all_reduce(split)
            sq = sq[0] + split
        return sq.sum().reshape(1)

    def _counts_in_norm(self, index: int) -> bool:
        """Whether slot `index` counts in the gradient norm (a pipeline counts a tied copy once)."""
        return True

    def _norm_runs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Shard ranges [lo, hi) of tp-replicated and of tp-split parameters (merged when adjacent)."""
        if self._runs is None:
            replicated: list[tuple[int, int]] = []
            split: list[tuple[int, int]] = []
            for slot, p in zip(self.zero.layout.slots, self.zero.layout.params):
                if not self._counts_in_norm(slot.index):
                    continue
                kind = split if tp_split_of(p) is not None else replicated
                if kind and kind[-1][1] == slot.offset:
                    kind[-1] = (kind[-1][0], slot.offset + slot.chunk)
                else:
                    kind.append((slot.offset, slot.offset + slot.chunk))
            self._runs = (replicated, split)
        return self._runs

    def train_batch(self, data_iter: Iterator) -> torch.Tensor:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; the mean loss."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.accumulation):
            out = call_model(self, next(data_iter))
            loss = loss_of(out)
            self.backward(loss)
            self.step()
            total += loss.detach().float()
        return total / self.accumulation

    # -- state -----------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in fp32 on every rank, keyed like the model's state_dict (a collective).

        Under tensor parallelism the tp slices are gathered and joined, so the keys and shapes
        are those of the model before it was split: a single-process model loads it as it is.
        """
        fulls = self.zero.full_parameters(read_master=self.optimizer.read_master)
        out, joined = {}, {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            index = self.zero.layout.index_of(t)
            if index is not None:
                value = fulls[index].view(self.zero.layout.slots[index].shape)
            elif isinstance(t, nn.Parameter):
                value = t.detach().float().clone()
            else:
                value = t.detach().clone()
            split = tp_split_of(t)
            if split is not None:
                if id(t) not in joined:  # a tied parameter is gathered once
                    joined[id(t)] = split.gather(value, self.tp_coll)
                value = joined[id(t)]
            out[name] = value
        return out

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state_dict as one process training it would hold it, on every rank
        (a collective): `full_state_dict` in the training dtype (parameters are the fp32 master
        rounded to it), names of one tied parameter sharing one tensor."""
        return export.in_model_dtype(self.full_state_dict(), dtype=self.param_dtype)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> Path:
        """Hugging Face's `save_pretrained` of the trained weights, written by rank 0 atomically
        (every rank calls it; runtime/export.py). `kwargs` go to the model's own save_pretrained."""
        export.check_pretrained(self.module)
        return export.save_pretrained(self.module, state_dict=self.consolidated_state_dict(), directory=save_directory,
                                      rank=self.groups.rank, device=self.device, **kwargs)

    def save_checkpoint(self, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None) -> Path:
        """Save this rank's shard and state, hashed and signed with its identity (every rank calls
        it; runtime/checkpoint.py); returns the checkpoint directory. A failure on any rank is
        every rank's CheckpointError."""
        if self.window_micro_steps:
            raise RuntimeError("save_checkpoint inside a gradient-accumulation window would lose the "
                               "accumulated gradients; save after engine.step() at a boundary")
        return engine_checkpoint.save(self, directory=save_dir,
                                      tag=f"global_step{self.global_steps}" if tag is None else tag,
                                      client_state=client_state or {})

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None) -> dict:
        """Restore everything `save_checkpoint` wrote, from a checkpoint of any world size, ZeRO
        stage, dp x tp x pp layout or offload (runtime/reshard.py); returns the client state.
        Every rank verifies what it reads and all agree before any state changes: a failure on
        one rank is a CheckpointError on every rank (runtime/engine_checkpoint.py)."""
        return engine_checkpoint.load(self, directory=load_dir, tag=tag)

    # -- measurements ------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Last step's time and throughput, this rank's peak memory, last step's communication."""
        out = {"rank": self.groups.rank, "global_steps": self.global_steps, "skipped_steps": self.skipped_steps,
               **self.meter.summary(), **peak_memory(self.device), "comms": self.last_comms}
        if self.scaler.check_overflow:
            out["loss_scale"] = self.scaler.loss_scale
        if self.last_grad_norm is not None:
            out["grad_norm"] = self.last_grad_norm
        return out

    @property
    def last_lr(self) -> float:
        """The first group's learning rate in the last optimizer step (0 before the first)."""
        return self.last_lrs[0] if self.last_lrs else 0.0

    def get_lr(self) -> float:
        """The first param group's learning rate for the next step."""
        return self._group_lrs()[0]

    def _group_lrs(self) -> list[float]:
        """Each group's lr for the next step: the plan's schedule's, or the groups' own."""
        return self.stepper.sync_lrs(None if self.plan.scheduler is None else self.schedule.lr())

    def train_micro_batch_size_per_gpu(self) -> int:
        """Samples per rank per forward (DeepSpeed's accessor, for sizing a data loader)."""
        return self.plan.batch.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def close(self) -> None:
        """Close the monitors, remove the hooks and swap files; destroy the process group if
        `initialize` created it."""
        self.monitors.close()
        self.zero.close()
        self.optimizer.close()
        self.groups.close()
        self.coll.close()
        self.world_coll.close()
        if self.tp_coll is not None:
            self.tp_coll.close()
