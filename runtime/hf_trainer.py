"""`ZeroplanTrainer`: `transformers.Trainer` training through zeroplan's engine.

Hugging Face routes `TrainingArguments(deepspeed=...)` through the deepspeed package and
Accelerate's DeepSpeed plugin, neither of which can hold another engine. This subclass keeps
everything of Trainer's loop that is not the distributed step (data, callbacks, logging,
evaluation, checkpoint rotation) and hands the step to zeroplan, the way Trainer hands it to
DeepSpeed:

- the config is a DeepSpeed config; its "auto" values are filled from TrainingArguments as
  Hugging Face fills them (hf_trainer_config.py), and it is compiled for this launch's world
  when training starts (the optimizer-step count is known then);
- without an `optimizer` block the Trainer's own optimizer (AdamW over its decay / no-decay
  groups) is the client optimizer, zeroplan stepping its groups on the shards; without a
  `scheduler` block the Trainer's scheduler (`lr_scheduler_type`, warmup) steps them. With the
  blocks, the config's optimizer over all trainable parameters and the config's schedule, as
  DeepSpeed does;
- no DDP wrapper: the model Trainer sees is the engine (`EngineModule`); `training_step` runs
  the engine's backward (the loss already scaled for accumulation by Trainer, so
  `scale_wrt_gas=False`) and step, which steps the optimizer where Trainer's accumulation window
  ends, its last shorter window included; clipping is the engine's (`gradient_clipping` =
  `max_grad_norm`) and the reported grad norm is the engine's;
- `save_model` writes the consolidated model with `save_pretrained` (every rank calls it, rank 0
  writes, atomically); a Trainer checkpoint holds the engine's sharded checkpoint in place of the
  torch optimizer and scheduler files, and `resume_from_checkpoint` restores it.

Only data parallelism (dp = world size): Trainer's data loader gives each process its own
batches, where tensor and pipeline parallel ranks must see the same one.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.trainer import TRAINING_ARGS_NAME

from zeroplan.schemas import ConfigError, Problem, load_config
from zeroplan.schemas.sources import read_config_file

from .engine import Engine
from .hf_trainer_config import fill_from_training_args
from .initialize import initialize

TRAINER_HOOKS = ("_wrap_model", "_clip_grad_norm", "_get_grad_norm", "_save_optimizer_and_scheduler",
                 "_load_optimizer_and_scheduler", "create_optimizer", "create_scheduler", "training_step")
"""Trainer's methods this class overrides; a transformers without one of them runs another loop."""


class EngineModule(nn.Module):
    """The model as Trainer sees it once the engine is built: a forward through the engine (dtype
    cast, ZeRO-3 gathers); gradients live in the engine's shards, so `zero_grad` has nothing to
    clear. `module` is the user's model, so Accelerate's unwrap and `_get_name` find it."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.module = engine.module
        self._engine = [engine]  # a list: not an nn.Module attribute

    def forward(self, *args, **kwargs):
        return self._engine[0](*args, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The engine zeroes its gradient shard at each optimizer step."""

    def _get_name(self) -> str:
        return self.module._get_name()


class _EngineState:
    """What Trainer and its callbacks see of the optimizer and the LR scheduler: the engine steps
    both inside `training_step`, so `step()` and `zero_grad()` do nothing (as Accelerate's
    DeepSpeed wrappers). Their state is in the engine's checkpoint: `state_dict()` says so, and
    `load_state_dict()` of anything else raises rather than drop it."""

    MARK = {"zeroplan": "the optimizer and scheduler state is in the engine's checkpoint"}

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.param_groups

    def step(self, *args, **kwargs) -> None:
        """The engine has stepped (training_step)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The engine zeroes its gradient shard at each optimizer step."""

    def get_last_lr(self) -> list[float]:
        """The learning rate of each group in the optimizer step just taken."""
        return list(self.engine.last_lrs)

    def state_dict(self) -> dict:
        return dict(self.MARK)

    def load_state_dict(self, state: dict) -> None:
        if state != self.MARK:
            raise ValueError("zeroplan's optimizer and scheduler state is restored from the engine's checkpoint "
                             "(trainer.train(resume_from_checkpoint=...)), not from a torch state dict")


class ZeroplanTrainer(transformers.Trainer):
    """`transformers.Trainer` whose distributed step is zeroplan's (see the module docstring).

    `config` is a DeepSpeed config (path or dict, "auto" allowed where Hugging Face fills it);
    `cluster`, `model_spec` and `tp_plan` are `zeroplan.initialize`'s. Everything else is
    Trainer's. `trainer.engine` is the Engine once training started.
    """

    def __init__(self, *args, config: str | Path | Mapping[str, Any], cluster: Any = None,
                 model_spec: Any = None, **kwargs):
        missing = [h for h in TRAINER_HOOKS if not callable(getattr(transformers.Trainer, h, None))]
        if missing:
            raise ImportError(f"ZeroplanTrainer needs transformers>=5.0 (found {transformers.__version__}, "
                              f"whose Trainer has no {', '.join(missing)})")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            _check_args(training_args)
        self.zeroplan_config = _config_dict(config)
        self.zeroplan_cluster, self.zeroplan_model_spec = cluster, model_spec
        self.engine: Engine | None = None
        super().__init__(*args, **kwargs)
        self._given = (self.optimizer, self.lr_scheduler)
        """Trainer(optimizers=(optimizer, scheduler)): zeroplan's client optimizer and scheduler."""

    # -- building the engine -------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.engine is None and self.state.max_steps > 0:
            self._build_engine(num_training_steps=self.state.max_steps)
        return self.optimizer if self.engine is not None else super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        return self.lr_scheduler if self.engine is not None else super().create_scheduler(num_training_steps,
                                                                                            optimizer)

    def _build_engine(self, *, num_training_steps: int) -> None:
        _check_data_parallel(self.zeroplan_config)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        config = fill_from_training_args(self.zeroplan_config, args=self.args, model=self.model,
                                         num_training_steps=num_training_steps, world_size=world)
        client: dict[str, Any] = {}
        given_optimizer, given_scheduler = self._given
        if "optimizer" not in config:  # Trainer's optimizer, with its decay groups
            self.optimizer = given_optimizer
            client["optimizer"] = super().create_optimizer()
        elif given_optimizer is not None:
            raise ConfigError(Problem("optimizer", "the config has an optimizer block and the Trainer was given "
                                      "an optimizer (optimizers=...): one would be dropped",
                                      suggestion="remove one of them"))
        if "scheduler" not in config:
            client["lr_scheduler"] = given_scheduler or self._scheduler_builder(num_training_steps)
        elif given_scheduler is not None:
            raise ConfigError(Problem("scheduler", "the config has a scheduler block and the Trainer was given "
                                      "an LR scheduler (optimizers=...): one would be dropped",
                                      suggestion="remove one of them"))
        engine = initialize(self.model, config=config, cluster=self.zeroplan_cluster,
                            model_spec=self.zeroplan_model_spec, **client)
        self.engine = engine
        self.optimizer = self.lr_scheduler = _EngineState(engine)

    def _scheduler_builder(self, num_training_steps: int):
        """Trainer's LR scheduler (`lr_scheduler_type`, warmup) over the optimizer zeroplan hands
        it. Built by `create_scheduler` on a copy whose scheduler is unset, as Hugging Face does
        for DeepSpeed, so a subclass's own `create_scheduler` is honoured."""
        def build(optimizer):
            trainer = copy.copy(self)
            trainer.engine, trainer.lr_scheduler = None, None
            return trainer.create_scheduler(num_training_steps, optimizer=optimizer)
        return build

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if self.engine is None:
            if training:
                return model
            return super()._wrap_model(model, training=training, dataloader=dataloader)
        return EngineModule(self.engine) if not isinstance(model, EngineModule) else model

    # -- the step ------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's forward and loss, then the engine's backward and step: at the end of
        Trainer's accumulation window (its `sync_gradients`) the engine steps the optimizer."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("ZeroplanTrainer's engine is built when training starts: call trainer.train()")
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        engine.set_gradient_accumulation_boundary(self.accelerator.gradient_state.sync_gradients)
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        return loss.detach()

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Trainer's rule: a loss normalised by `num_items_in_batch` (by the model or by
        `compute_loss_func`) is already the accumulated batch's share."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _clip_grad_norm(self, model):
        """The engine clipped at `gradient_clipping` (= max_grad_norm); its norm before clipping."""
        return self._get_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        return self.engine.last_grad_norm if self.engine is not None else super()._get_grad_norm(model, grad_norm)

    # -- saving --------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The whole trained model, `from_pretrained`-loadable (every rank calls it: the weights
        are gathered from the shards; rank 0 writes), with the processing class and the
        TrainingArguments as Trainer saves them."""
        if self.engine is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.engine.save_pretrained(output_dir, safe_serialization=True)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The engine's sharded checkpoint (master weights, optimizer and scheduler state, RNG,
        counters) in the Trainer's checkpoint directory, as DeepSpeed's is."""
        self.engine.save_checkpoint(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self.engine is None:
            raise RuntimeError("resuming needs the engine: resume with trainer.train(resume_from_checkpoint=...)")
        self.engine.load_checkpoint(checkpoint)


def _config_dict(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, Path)):
        return read_config_file(config)
    raise ConfigError(Problem("config", f"expected a DeepSpeed config path or dict, got {type(config).__name__}"))


def _check_data_parallel(config: dict[str, Any]) -> None:
    """Trainer's data loader gives every process its own batches, where a tp or pp group needs
    the same one: only dp = world size (degrees left out or 1)."""
    with warnings.catch_warnings():  # compile reports the config's notices once, later
        warnings.simplefilter("ignore")
        cfg = load_config(config)
    degrees = {"tp": cfg.tp, "pp": cfg.parallel.pp}
    other = {k: v for k, v in degrees.items() if v not in (None, 1)}
    if other:
        given = ", ".join(f"{k} {v}" for k, v in other.items())
        raise ConfigError(Problem("parallel", f"ZeroplanTrainer runs data parallelism only, the config asks for "
                                  f"{given}: Trainer's data loader gives every process its own batches, where a "
                                  "tensor or pipeline parallel group needs the same one", given=given,
                                  suggestion="set the tensor / pipeline degrees to 1, or train with "
                                  "zeroplan.initialize in your own loop"))


def _check_args(args) -> None:
    """TrainingArguments that would hand the step to another engine."""
    problems = []
    if getattr(args, "deepspeed", None):
        problems.append(Problem("TrainingArguments.deepspeed", "asks Trainer to run DeepSpeed itself",
                                given=args.deepspeed, suggestion="pass the DeepSpeed config as "
                                "ZeroplanTrainer(config=...) and leave deepspeed unset"))
    if getattr(args, "fsdp", None):
        problems.append(Problem("TrainingArguments.fsdp", "asks Trainer to shard the model with FSDP",
                                given=args.fsdp, suggestion="leave fsdp unset: zeroplan shards the model"))
    if problems:
        raise ConfigError(problems, source="TrainingArguments given to ZeroplanTrainer")
