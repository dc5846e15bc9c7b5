"""Activation checkpointing: keep each checkpointed block's inputs, recompute its forward in
backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; full
recomputation as in Korthikanti et al. 2022, section 4.2, which the memory model counts).

`ActivationCheckpointing(fn, *args, **kwargs)` has the signature of
`torch.utils.checkpoint.checkpoint` and of Hugging Face's `_gradient_checkpointing_func`, and
DeepSpeed's `activation_checkpointing` semantics:
- `enabled`: run `fn` under torch's non-reentrant checkpoint (any autograd use, any number of
  outputs, nested modules' hooks included); off, it is a plain call;
- `partition_activations`: each positional tensor argument is kept as this tp rank's 1/tp slice and
  all-gathered over the tp group before the recompute (the block input is replicated over tp,
  so the slices together are the whole; Megatron/DeepSpeed's `partition_activations`); with
  sequence parallelism the block input is already this rank's 1/tp of the sequence and is kept
  as it is (`initialize` passes no tp group), which is what Megatron-LM keeps there too;
- `cpu_checkpointing`: the kept arguments (or slices) live in host memory and are copied back
  for the recompute (on a CPU device host and device memory are the same: nothing moves).

The recompute calls `fn` again, so when `fn` is a module's `__call__` its forward hooks run
again too: ZeRO-3 gathers the block's parameters for the recompute and releases them after,
and the tensor-parallel layers repeat their forward all-reduces (counted by the compiler's
comm model). Random state is restored for the recompute (torch's `preserve_rng_state`). The
recompute runs to the end of `fn`: torch would stop it as soon as the last saved tensor is
rebuilt (early stop), inside the last module's forward, whose post-forward hook would then never
run, so ZeRO-3 would keep that module's parameters gathered, stale after the step.

How a model takes it (the hook, set by `initialize` when the plan enables checkpointing):
a module with a `checkpoint_fn` attribute (None by default) calls `self.checkpoint_fn(block, x)`
instead of `block(x)` for each block when it is set, as the built-in GPT and the pipeline
stages do; a Hugging Face model gets it through `gradient_checkpointing_enable`. A plan that
enables checkpointing for a model with neither is refused: nothing would be recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.plan import ActivationCheckpointingPlan

from .comm import Collectives

HOOK = "checkpoint_fn"
"""The attribute a module declares (None) to take the checkpoint function."""


class _KeptArgs:
    """The checkpointed call's arguments: whole during the forward, then each tensor argument
    cut to this rank's tp slice and/or moved to host memory until the recompute asks for it."""

    def __init__(self, args: tuple, kwargs: dict, *, tp_coll: Collectives | None, cpu: bool):
        self.args, self.kwargs = args, kwargs
        self.tp_coll, self.cpu = tp_coll, cpu
        self._kept: dict[int, tuple] = {}

    def keep(self) -> None:
        """After the forward: replace every tensor argument by its slice / host copy."""
        if self.tp_coll is None and not self.cpu:
            return
        args = list(self.args)
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            piece = _slice(a, self.tp_coll) if self.tp_coll is not None else a.detach()
            if self.cpu:
                piece = piece.to("cpu", copy=piece.device.type != "cpu")
            self._kept[i] = (piece, a.shape, a.device, a.requires_grad)
            args[i] = None
        self.args = tuple(args)

    def restore(self) -> tuple:
        """For the recompute: the arguments whole again, on their device."""
        if not self._kept:
            return self.args
        args = list(self.args)
        for i, (piece, shape, device, requires_grad) in self._kept.items():
            piece = piece.to(device)
            whole = _unslice(piece, shape, self.tp_coll) if self.tp_coll is not None else piece
            args[i] = whole.requires_grad_(requires_grad)  # the recompute must save what the forward saved
        return tuple(args)


def _slice(t: torch.Tensor, coll: Collectives) -> torch.Tensor:
    """This rank's contiguous 1/size of `t` flattened (zero-padded to a multiple of size)."""
    flat = t.detach().reshape(-1)
    per = math.ceil(flat.numel() / coll.size)
    lo, hi = min(coll.rank * per, flat.numel()), min((coll.rank + 1) * per, flat.numel())
    out = flat.new_zeros(per)
    out[:hi - lo] = flat[lo:hi]
    return out


def _unslice(piece: torch.Tensor, shape: torch.Size, coll: Collectives) -> torch.Tensor:
    whole = piece.new_empty(piece.numel() * coll.size)
    coll.all_gather(whole, piece)
    return whole[:math.prod(shape)].view(shape)


class ActivationCheckpointing:
    """The checkpoint function a plan asks for; `__call__(fn, *args, **kwargs)` runs `fn`.
    `__init__` stores; `tp_coll` is the tp group's collectives (None when tp = 1)."""

    def __init__(self, *, plan: ActivationCheckpointingPlan, tp_coll: Collectives | None = None):
        self.plan = plan
        self.tp_coll = tp_coll if plan.partition_activations and tp_coll is not None and tp_coll.size > 1 else None
        self.calls = 0
        """Checkpointed calls so far (each is recomputed once in backward)."""

    def __call__(self, fn: Callable, *args, **kwargs):
        if not self.plan.enabled or not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        kept = _KeptArgs(args, kwargs, tp_coll=self.tp_coll, cpu=self.plan.cpu_checkpointing)
        first = [True]

        def run():
            call_args = kept.args if first[0] else kept.restore()
            first[0] = False
            return fn(*call_args, **kept.kwargs)

        with set_checkpoint_early_stop(False):  # the recompute must reach every forward hook (below)
            out = checkpoint(run, use_reentrant=False)
        kept.keep()
        self.calls += 1
        return out


def install(model: nn.Module, ac: ActivationCheckpointing) -> int:
    """Give every module of `model` that takes the hook the checkpoint function; a Hugging
    Face model gets it through `gradient_checkpointing_enable`. Returns how many modules took
    it; with checkpointing enabled and none, a ConfigError (the plan would promise memory the
    run does not save)."""
    if not ac.plan.enabled:
        return 0
    taken = 0
    for module in model.modules():
        if hasattr(module, HOOK):
            setattr(module, HOOK, ac)
            taken += 1
    if taken == 0 and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = ac
                taken += 1
    if taken == 0:
        raise ConfigError(Problem(
            "activation_checkpointing.enabled", f"the plan recomputes activations, but {type(model).__name__} "
            f"has no checkpoint hook, so nothing would be recomputed and the plan's memory would not hold",
            given=True, suggestion=f"give the module that runs the blocks a `{HOOK} = None` attribute and call "
            f"`self.{HOOK}(block, x)` when it is set (zeroplan.runtime.checkpointing), or compile with "
            "activation_checkpointing.enabled false"))
    return taken
