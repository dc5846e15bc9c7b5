"""`initialize(..., model_parameters=, optimizer=, lr_scheduler=)`, as `deepspeed.initialize` takes them.

zeroplan steps its own optimizer on each rank's flat fp32 shard (optim.py), never a torch one.
What the arguments give it:

- `model_parameters`: the parameters to train, or torch param-group dicts (`{"params": [...],
  "lr": ..., "weight_decay": ..., "betas": ..., "eps": ...}`; param_groups.HYPER lists what each
  optimizer type takes per group). A trainable parameter left out of every group is not
  stepped, as a torch optimizer never steps a parameter it was not given. Default: every
  trainable parameter in one group. The plan's `no_decay` patterns then split each group.
- `optimizer`: a torch.optim.AdamW, Adam or SGD instance, or a callable that builds one from
  the groups (DeepSpeed's client optimizer). zeroplan reads its type, defaults and groups (the
  config's optimizer block is compiled from them) and steps them itself: the instance itself
  is never stepped and allocates no state. Other classes are refused: zeroplan cannot run
  their update on a shard. Per-group momentum, amsgrad and maximize are refused too.
- `lr_scheduler`: a torch LR scheduler over that optimizer, or a callable that builds one from
  the optimizer holding the groups (the user's, else a `GroupsHolder`): stepped after every
  optimizer step zeroplan takes (not after an fp16 overflow skips one), each group's lr read
  from the optimizer at every step.

The config's optimizer or scheduler block and the matching argument together are an error:
DeepSpeed would use one and silently drop the other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zeroplan.schemas import ConfigError, Plan, Problem, TrainConfig
from zeroplan.schemas.optim import OptimizerConfig
from zeroplan.schemas.plan import OptimizerPlan

from .param_groups import HYPER, WHOLE_SHARD, no_decay_split

CLASSES = {torch.optim.AdamW: "AdamW", torch.optim.Adam: "Adam", torch.optim.SGD: "SGD"}
"""The torch optimizer classes whose groups and hyper-parameters zeroplan steps itself."""


class GroupsHolder(torch.optim.Optimizer):
    """The param groups as a torch optimizer, for a torch LR scheduler (which needs one) and for
    `engine.param_groups`. zeroplan steps its own optimizer: this one is never stepped."""

    def step(self, closure=None):
        raise RuntimeError("zeroplan steps its own optimizer on the shard: call engine.step()")


@dataclass(frozen=True)
class BoundGroups:
    """The groups a plan trains, the torch optimizer holding them, the LR scheduler stepping them."""

    holder: torch.optim.Optimizer
    group_by_name: dict[str, int]
    """Parameter name (every name of a tied one) -> index of its group in `holder.param_groups`."""
    scheduler: Any | None = None

    def group_of(self, model: nn.Module) -> dict[int, int]:
        """id(parameter) -> group index for `model`'s parameters as they are now: tensor
        parallelism replaces a parameter by its slice under the same name."""
        return {id(p): self.group_by_name[name] for name, p in model.named_parameters(remove_duplicate=False)
                if name in self.group_by_name}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the groups: each one's hyper-parameters (an LR scheduler
        sets their lr) and the LR scheduler's own state; the parameters are the engine's."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.holder.param_groups]
        return {"groups": groups, "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def refusal(self, state: dict) -> str | None:
        """Why `state` (a checkpoint's `state_dict()`) cannot be restored into this run, or None:
        other groups, or a scheduler where this run has none (or none where it has one), would go
        on with another schedule, silently."""
        if len(state["groups"]) != len(self.holder.param_groups):
            return (f"the checkpoint has {len(state['groups'])} parameter group(s), this run "
                    f"{len(self.holder.param_groups)}: build the groups as the saving run did")
        if (state["scheduler"] is None) != (self.scheduler is None):
            saved = "no LR scheduler" if state["scheduler"] is None else "an LR scheduler's state"
            return (f"the checkpoint holds {saved} and this run {'has one' if self.scheduler else 'has none'}: "
                    "pass the lr_scheduler= the saving run had")
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values (`refusal(state)` is None)."""
        for group, saved in zip(self.holder.param_groups, state["groups"]):
            group.update(saved)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def step_scheduler(self) -> None:
        """After an optimizer step taken. torch warns that the scheduler stepped before its
        optimizer: zeroplan never calls that optimizer's step, by design."""
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                self.scheduler.step()


class ClientOptimizer:
    """The arguments, checked; `__init__` only stores (see the module docstring)."""

    def __init__(self, *, model: nn.Module, model_parameters: Iterable | None = None, optimizer: Any = None,
                 lr_scheduler: Any = None):
        self.model = model
        self.model_parameters = None if model_parameters is None else list(model_parameters)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self._instance: torch.optim.Optimizer | None = None
        self._groups: tuple[tuple[str, ...], list[dict]] | None = None

    # -- before the plan: the config's optimizer block ----------------------------------------
    def complete_config(self, config: TrainConfig) -> TrainConfig:
        """`config` with the optimizer block the instance implies (ConfigError when it has one)."""
        self._check_scheduler(has_block=config.scheduler is not None, where="the config's scheduler block")
        self._resolve(config.param_groups.no_decay)
        if self._instance is None:
            return config
        if config.optimizer is not None:
            raise ConfigError(Problem("optimizer", "the config's optimizer block and initialize(optimizer=...) "
                                      "both give the optimizer", given=type(self._instance).__name__,
                                      suggestion="remove the config's optimizer block, or leave out optimizer="))
        return config.model_copy(update={"optimizer": OptimizerConfig.model_validate(_block(self._instance))})

    # -- with the plan: the groups it trains -----------------------------------------------------
    def bind(self, plan: Plan) -> BoundGroups:
        """The groups for `plan`, checked against its optimizer, and the scheduler built."""
        opt = plan.optimizer
        self._check_scheduler(has_block=plan.scheduler is not None, where="the plan's scheduler")
        groups = self._resolve(opt.no_decay)
        if self._instance is not None:
            _check_kind(self._instance, opt)
        holder = self._instance or GroupsHolder(groups, _defaults(opt))
        for i, group in enumerate(holder.param_groups):
            _check_group(group, opt, index=i)
        index = {id(p): i for i, g in enumerate(holder.param_groups) for p in g["params"]}
        by_name = {name: index[id(p)] for name, p in self.model.named_parameters(remove_duplicate=False)
                   if id(p) in index}
        return BoundGroups(holder=holder, group_by_name=by_name, scheduler=self._scheduler(holder))

    def _resolve(self, no_decay: tuple[str, ...]) -> list[dict]:
        """The groups (the instance's, else model_parameters' split by `no_decay`), once per `no_decay`."""
        if self._groups is not None and self._groups[0] == no_decay:
            return self._groups[1]
        if isinstance(self.optimizer, torch.optim.Optimizer):
            if no_decay:
                raise ConfigError(Problem("param_groups.no_decay", "an optimizer instance brings its own groups, "
                                          "so their weight decay is its own", given=list(no_decay),
                                          suggestion="build the instance's groups without decay for those "
                                          "parameters, pass a callable optimizer=, or drop param_groups.no_decay"))
            self._instance = self.optimizer
            groups = self._instance.param_groups
        else:
            groups = no_decay_split(self._given_groups(), model=self.model, patterns=no_decay)
            if self.optimizer is not None:
                self._instance = _built(self.optimizer, groups)
                groups = self._instance.param_groups
        _check_params(groups, self.model)
        self._groups = (no_decay, groups)
        return groups

    def _given_groups(self) -> list[dict]:
        given = self.model_parameters
        if given is None:
            return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if all(isinstance(g, dict) for g in given):
            for i, g in enumerate(given):
                if "params" not in g:
                    raise ConfigError(Problem(f"model_parameters[{i}]", "a param group needs 'params'",
                                              given=sorted(g)))
            return [{**g, "params": _as_list(g["params"])} for g in given]
        if all(isinstance(p, torch.Tensor) for p in given):
            return [{"params": given}]
        raise ConfigError(Problem("model_parameters", "expected parameters or param-group dicts, not a mix",
                                  given=sorted({type(g).__name__ for g in given})))

    def _check_scheduler(self, *, has_block: bool, where: str) -> None:
        if has_block and self.lr_scheduler is not None:
            raise ConfigError(Problem("scheduler", f"{where} and initialize(lr_scheduler=...) both give the "
                                      "learning-rate schedule", suggestion="remove one of them"))

    def _scheduler(self, holder: torch.optim.Optimizer):
        given = self.lr_scheduler
        if given is None:
            return None
        if hasattr(given, "step") and hasattr(given, "optimizer"):
            if given.optimizer is not holder:
                raise ConfigError(Problem("lr_scheduler", "it steps an optimizer initialize was not given, whose "
                                          "groups zeroplan never reads", given=type(given).__name__,
                                          suggestion="pass that optimizer as optimizer=, or a callable "
                                          "lr_scheduler=lambda opt: ... that builds the scheduler"))
            return given
        if callable(given):
            return given(holder)
        raise ConfigError(Problem("lr_scheduler", "expected a torch LR scheduler or a callable building one",
                                  given=type(given).__name__))


def _as_list(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _built(factory: Callable, groups: list[dict]) -> torch.optim.Optimizer:
    if not callable(factory):
        raise ConfigError(Problem("optimizer", "expected a torch optimizer or a callable building one",
                                  given=type(factory).__name__))
    built = factory(groups)
    if not isinstance(built, torch.optim.Optimizer):
        raise ConfigError(Problem("optimizer", "the callable must return a torch optimizer",
                                  given=type(built).__name__))
    return built


def _kind(optimizer: torch.optim.Optimizer) -> str:
    """'AdamW', 'Adam' (L2 weight decay) or 'SGD'; ConfigError for another class."""
    kind = CLASSES.get(type(optimizer))
    if kind is None:
        raise ConfigError(Problem("optimizer", f"{type(optimizer).__name__} cannot be stepped on zeroplan's "
                                  "flat shards: zeroplan reads torch.optim.AdamW, Adam and SGD instances for "
                                  "their groups and hyper-parameters and runs the update itself",
                                  given=type(optimizer).__name__,
                                  suggestion="pass torch.optim.AdamW, Adam or SGD, or leave optimizer= out and "
                                  "name the optimizer in the config (Adam, AdamW, SGD, Lamb, Lion, Adagrad)"))
    if kind == "Adam" and optimizer.defaults.get("decoupled_weight_decay"):
        return "AdamW"
    return kind


def _block(optimizer: torch.optim.Optimizer) -> dict:
    """The config's optimizer block for the instance, from its defaults."""
    kind, d = _kind(optimizer), optimizer.defaults
    if kind == "SGD":
        params = {k: d[k] for k in ("momentum", "dampening", "nesterov", "weight_decay")}
    else:
        params = {"betas": list(d["betas"]), "eps": d["eps"], "weight_decay": d["weight_decay"]}
        if kind == "Adam":
            params["adam_w_mode"] = False
    return {"type": kind, "params": {"lr": float(d["lr"]), **params}}


def _plan_kind(opt: OptimizerPlan) -> str:
    if opt.type in ("Adam", "AdamW"):
        return "AdamW" if opt.decoupled_weight_decay else "Adam"
    return opt.type


def _check_kind(optimizer: torch.optim.Optimizer, opt: OptimizerPlan) -> None:
    kind, planned = _kind(optimizer), _plan_kind(opt)
    if kind != planned:
        raise ConfigError(Problem("optimizer", f"the plan steps {planned}, optimizer= is {kind} "
                                  f"({type(optimizer).__name__})", given=type(optimizer).__name__,
                                  suggestion=f"compile the plan with optimizer.type {kind}, or pass a "
                                  f"{planned} optimizer"))


def _defaults(opt: OptimizerPlan) -> dict:
    """A group's values where it gives none: the plan's."""
    values = {"lr": opt.lr, **{k: getattr(opt, k) for k in HYPER[opt.type]}}
    if opt.type == "SGD":
        values.update(momentum=opt.momentum, dampening=opt.dampening, nesterov=opt.nesterov)
    return values


def _check_group(group: dict, opt: OptimizerPlan, *, index: int) -> None:
    """What a group may not change: switches zeroplan does not implement, SGD's momentum (its
    state exists or not for the whole shard), and anything but lr for Lamb (one whole-shard
    update)."""
    fixed = {"amsgrad": False, "maximize": False, "differentiable": False}
    if opt.type in ("Adam", "AdamW"):
        fixed["decoupled_weight_decay"] = opt.decoupled_weight_decay
    if opt.type == "SGD":
        fixed.update(momentum=opt.momentum, dampening=opt.dampening, nesterov=opt.nesterov)
    if opt.type in WHOLE_SHARD:
        fixed.update(lr=opt.lr, weight_decay=opt.weight_decay)
    problems = [Problem(f"param_groups[{index}].{key}", f"a group cannot set {key} to {group[key]!r} here "
                        f"(the plan's {opt.type} steps with {want!r})", given=group[key],
                        suggestion="leave it out of the group, or set it in the config's optimizer block")
                for key, want in fixed.items() if key in group and _differs(group[key], want)]
    if problems:
        raise ConfigError(problems, source="initialize(optimizer=/model_parameters=)")


def _differs(value, want) -> bool:
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value != want


def _check_params(groups: list[dict], model: nn.Module) -> None:
    """Every grouped tensor is a parameter of `model`, in one group only."""
    own = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    for i, group in enumerate(groups):
        for p in group["params"]:
            if id(p) not in own:
                raise ConfigError(Problem(f"param_groups[{i}]", "holds a tensor that is not a parameter of the model",
                                          given=f"{type(p).__name__} {tuple(p.shape)}"))
            if id(p) in seen:
                raise ConfigError(Problem(f"param_groups[{i}]", "a parameter is in more than one group (torch.optim "
                                          "refuses it too)", given=tuple(p.shape)))
            seen.add(id(p))
