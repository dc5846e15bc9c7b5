"""Parameter groups on the flat shard, and parameters without gradients, as torch.optim has them.

A group is a torch-style dict (`{"params": [...], "lr": ..., "weight_decay": ...}`) held by a
torch optimizer (client_optim.py): the user's, or one zeroplan builds only to hold the groups
for LR schedulers. `GroupStepper` turns them into the `Run`s a master steps (optim_runs.py):

  1. each group's lr for this step: the plan's schedule scales every group's initial lr by the
     same factor (as torch's LambdaLR does; DeepSpeed's own schedulers give every group the same
     rate instead), or, with no schedule in the plan, the group's lr as it is now (a torch LR
     scheduler's, or the user's own edit);
  2. which slots got a gradient in this step on some dp rank (`missing_grads: skip`, one byte
     per slot, all-reduced with MAX); with `zero` every slot steps, DeepSpeed's zero-fill;
  3. runs: maximal shard ranges of slots with one group and one step count. A slot outside
     every group, or without a gradient, is in no run and stays as it is, with its state;
     torch.optim counts steps per parameter, so a slot keeps how many steps it missed (`lag`)
     and steps with its own count. Lamb steps the whole shard in one run, each tensor with its
     own count, the slots without a gradient put back after it (optim_runs.py).

`no_decay_split` applies the plan's `no_decay` patterns (schemas.optim.ParamGroupsConfig).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from zeroplan.schemas.plan import OptimizerPlan

from .comm import Collectives
from .optim_runs import Run
from .zero.layout import ShardLayout

HYPER = {"Adam": ("weight_decay", "betas", "eps"), "AdamW": ("weight_decay", "betas", "eps"),
         "SGD": ("weight_decay",), "Lion": ("weight_decay", "betas"), "Adagrad": ("weight_decay", "eps"),
         "Lamb": ()}
"""Per optimizer type, the hyper-parameters (OptimizerPlan fields) a group may set besides `lr`."""

WHOLE_SHARD = ("Lamb",)
"""Optimizers whose update is not element-wise (optim_lamb.py): one run over the whole shard."""


def no_decay_split(groups: list[dict], *, model: nn.Module, patterns: tuple[str, ...]) -> list[dict]:
    """Each group as its parameters that decay and, after them, those matching `patterns` with
    weight_decay 0 (empty groups dropped); `groups` unchanged when there are no patterns."""
    if not patterns:
        return groups
    exempt = {id(p) for name, p in model.named_parameters() if _matches(model, name, patterns)}
    out = []
    for group in groups:
        decay = [p for p in group["params"] if id(p) not in exempt]
        other = [p for p in group["params"] if id(p) in exempt]
        out += [g for g in ({**group, "params": decay}, {**group, "params": other, "weight_decay": 0.0})
                if g["params"]]
    return out


def _matches(model: nn.Module, name: str, patterns: tuple[str, ...]) -> bool:
    """A name pattern is searched in the lowercased name; `type:<regex>` must fully match the
    class or a base class of a module on the parameter's path (the model itself excluded)."""
    parts = name.split(".")[:-1]
    classes = {cls.__name__ for i in range(1, len(parts) + 1)
               for cls in type(model.get_submodule(".".join(parts[:i]))).__mro__}
    for pattern in patterns:
        if pattern.startswith("type:"):
            if any(re.fullmatch(pattern[5:], c) for c in classes):
                return True
        elif re.search(pattern, name.lower()):
            return True
    return False


class GroupStepper:
    """The runs of each optimizer step for one rank's shard (see the module docstring)."""

    def __init__(self, *, param_groups: list[dict], group_of: dict[int, int], plan: OptimizerPlan,
                 layout: ShardLayout, coll: Collectives, device: torch.device):
        self.param_groups = param_groups
        """The groups, live: the dicts of the torch optimizer that holds them."""
        self.plan, self.layout, self.coll, self.device = plan, layout, coll, device
        self.slot_group = [group_of.get(id(p)) for p in layout.params]
        """Group index of each slot; None: in no group, never stepped (torch.optim never sees it)."""
        self.lag = [0] * len(layout)
        """Optimizer steps each slot missed for want of a gradient."""
        self._plans: dict[tuple, OptimizerPlan] = {}

    def sync_lrs(self, scheduled: float | None) -> list[float]:
        """Each group's lr for the next step (phase 1); `scheduled` is the plan's schedule's rate,
        None when the plan has no schedule. The groups hold the result."""
        if scheduled is not None:
            base = self.plan.lr
            for group in self.param_groups:
                initial = group.setdefault("initial_lr", group["lr"])
                group["lr"] = scheduled if initial == base else initial * scheduled / base
        return [float(group["lr"]) for group in self.param_groups]

    def stepped(self, received: bytearray) -> list[bool]:
        """Per slot: steps now (phase 2). A collective over dp with `missing_grads: skip`."""
        if self.plan.missing_grads == "zero":
            return [True] * len(self.layout)
        flags = torch.tensor(list(received), dtype=torch.uint8, device=self.device)
        if self.coll.size > 1:
            self.coll.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.bool().tolist()

    def runs(self, stepped: list[bool], *, taken: int, beta1: float | None) -> tuple[list[Run], list[tuple[int, int]]]:
        """The step's runs and the ranges to keep (phase 3); `taken`: optimizer steps taken so far."""
        lrs = [float(group["lr"]) for group in self.param_groups]
        whole = self.plan.type in WHOLE_SHARD
        runs: list[Run] = []
        keep: list[tuple[int, int]] = []
        for slot, group, lag, steps in zip(self.layout.slots, self.slot_group, self.lag, stepped):
            lo, hi = slot.offset, slot.offset + slot.chunk
            if group is None or not steps:
                keep.append((lo, hi))
                continue
            count = None if whole or not lag else taken - lag
            last = runs[-1] if runs else None
            if last is not None and last.hi == lo and (last.plan, last.lr, last.steps_before) == (
                    self._plan(group), lrs[group], count):
                runs[-1] = Run(last.lo, hi, last.plan, last.lr, beta1, count)
            else:
                runs.append(Run(lo, hi, self._plan(group), lrs[group], beta1, count))
        if whole and runs:
            segments = tuple(taken - lag for lag in self.lag) if any(self.lag) else None
            runs = [Run(0, self.layout.numel, runs[0].plan, runs[0].lr, beta1, None, segments)]
        return runs, (keep if whole else [])

    def advance(self, stepped: list[bool]) -> None:
        """After a step taken: each slot that did not step falls one behind."""
        self.lag = [lag + (not steps) for lag, steps in zip(self.lag, stepped)]

    def _plan(self, group: int) -> OptimizerPlan:
        """The plan's hyper-parameters with the group's (cached by value: groups rarely change)."""
        values = self.param_groups[group]
        update = {k: tuple(values[k]) if k == "betas" else float(values[k])
                  for k in HYPER[self.plan.type] if k in values}
        key = tuple(sorted(update.items()))
        if key not in self._plans:
            self._plans[key] = self.plan.model_copy(update=update)
        return self._plans[key]

    def state_dict(self, *, names: dict[str, str]) -> dict[str, int]:
        """Steps missed per parameter (only those that missed any), under `names` (slot name ->
        the plain model's name; absent: the same), so that any layout reads it back."""
        return {names.get(slot.name, slot.name): lag for slot, lag in zip(self.layout.slots, self.lag) if lag}

    def load_state_dict(self, state: dict[str, int], *, names: dict[str, str]) -> None:
        self.lag = [int(state.get(names.get(slot.name, slot.name), 0)) for slot in self.layout.slots]
