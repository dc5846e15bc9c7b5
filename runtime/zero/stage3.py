"""ZeRO stage 3: parameters partitioned too (ZeRO paper, arXiv:1910.02054, P_os+g+p).

Each rank keeps only its chunk of every parameter (in the parameters' dtype, the partition in
`param_store`; on the device it is the fp32 master itself when training in fp32). A module's own
parameters (and its external ones, below) are gathered whole just before they are used and
released right after:

  forward   pre-hook: all_gather the module's parameters (waiting on a prefetch if one is in
            flight), then prefetch the next modules of the recorded forward order, async, up
            to `prefetch_bucket_size` elements and while at most `max_live_parameters`
            elements are gathered or in flight; post-hook: release them (data swapped for a
            placeholder, see below), unless the recorded order uses the module again within
            `max_reuse_distance` gathered elements (DeepSpeed's stage3_max_reuse_distance).
  backward  autograd's saved-tensor hooks record a partitioned parameter (or a view of one)
            as (parameter, view geometry) instead of keeping the gathered storage alive; when
            backward unpacks it, the module's parameters are gathered again (prefetching the
            modules the recorded first backward gathered next). A parameter is released as soon as its
            gradient is accumulated (post-accumulate-grad hook), after the gradient is handed
            to the bucketed reduce-scatter of stage 2.
  step      the fp32 master shard is updated and written to the partition (`param_store`, see
            param_store.py: device memory, or host memory / NVMe files with `offload_param`, read
            back ahead of each gather); parameters under
            `param_persistence_threshold` elements stay whole on every rank and are
            all-gathered after the step, like stage 1-2 parameters.

A released parameter keeps its shape and becomes an object that refuses to be read
(released.py): its data is one NaN expanded to the shape (stride 0, because autograd lays out a
gradient after the parameter it accumulates into, and some parameters are never gathered in
backward: an embedding's backward needs only its indices), and its class is swapped for one
whose `__torch_function__` passes metadata through and sends reads here:

  inside a forward   a parameter read by a module that does not own it (a weight tied or
                     reused by its parent, `F.linear(h, self.emb.weight)`) is gathered and
                     becomes an external parameter of the innermost module running, as
                     DeepSpeed's `register_external_parameter` makes it: that module's forward
                     keeps it gathered from then on, and the forward order is recorded again;
  inside backward    it is gathered and released once its gradient is accumulated. Autograd
                     sums every use of a parameter into one AccumulateGrad call, so the
                     gradient handed to the reduce-scatter is complete;
  anywhere else      ParameterNotGathered, naming the parameter. `hold`/`unhold` keep
                     parameters gathered for `zeroplan.gathered(...)`.

Every rank must run the same modules in the same order (as in DeepSpeed): gathers are
collectives. Frozen parameters stay whole on every rank.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch import nn

from .base import ZeroStage
from .comm import GatherHandle, gather_groups, gather_slots
from .param_store import ParamStore
from .released import ParameterNotGathered, mark_gathered, mark_released
from .stage12 import Stage2

EXTERNAL = "_zeroplan_external_parameters"
"""Module attribute: parameters registered as external to it before the engine was built
(`zeroplan.register_external_parameter` on a model not yet initialized)."""


class Stage3(Stage2):
    stage = 3

    def __init__(self, *, units: dict[nn.Module, list[int]], persistent: set[int], param_store: ParamStore,
                 prefetch_bucket_size: int, max_live_parameters: int = 2**63 - 1,
                 max_reuse_distance: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        """Module -> slot indices of its own partitioned parameters."""
        self._gathers: dict[nn.Module, list[int]] = {m: list(slots) for m, slots in units.items()}
        """Module -> what its forward gathers: its own partitioned parameters and its external ones."""
        self._hooked: set[nn.Module] = set()
        self._running: list[nn.Module] = []
        """Hooked modules whose forward is running, innermost last."""
        self._held: Counter[int] = Counter()
        """Slot -> open `hold`s (zeroplan.gathered blocks) keeping it gathered."""
        self._names: dict[int, list[str]] = defaultdict(list)
        self._rerecord = False
        self.persistent = persistent
        self.param_store = param_store
        self.prefetch_bucket_size = prefetch_bucket_size
        self.max_live_parameters = max_live_parameters
        self.max_reuse_distance = max_reuse_distance
        self.peak_live = 0
        """Most elements of partitioned parameters gathered or in flight at once (for tests)."""
        self._position: dict[nn.Module, int] = {}
        self._home = {}
        for module, slots in units.items():
            for i in slots:
                self._home.setdefault(i, module)
        nan = torch.full((1,), float("nan"), dtype=param_store.dtype, device=param_store.device)
        self._released = [nan.expand(slot.shape) for slot in self.layout.slots]
        self._gathered: set[int] = set(persistent)
        self._inflight: dict[int, GatherHandle] = {}
        self._users: dict[int, int] = defaultdict(int)
        self._trace: list[nn.Module] = []
        self._backward_trace: list[nn.Module] = []
        """Modules in the order the first backward gathered them (for its prefetch)."""
        self._backward_cursor = 0
        self._recording = True
        self._in_backward = False
        self._cursor = 0

    # -- set-up ----------------------------------------------------------------------------
    def attach(self) -> None:
        super().attach()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if self.layout.index_of(p) is not None:
                self._names[self.layout.index_of(p)].append(name)
        # Every module that holds parameters is hooked: a read of a parameter it does not own
        # makes that parameter its external one (see the module docstring).
        for module in self.model.modules():
            if next(module.parameters(), None) is not None:
                self._hook(module)
            for p in module.__dict__.get(EXTERNAL, ()):
                self.register_external(module, p)
        # The parameters arrive whole (the model as built): mark them gathered so that releasing
        # them drops the whole copy now, not at their module's first forward.
        self._gathered.update(range(len(self.layout)))
        for i in range(len(self.layout)):
            self._release(i)

    def _hook(self, module: nn.Module) -> None:
        if module not in self._hooked:
            self._hooked.add(module)
            self._hooks.append(module.register_forward_pre_hook(self._pre_forward))
            self._hooks.append(module.register_forward_hook(self._post_forward))

    # -- gather / release --------------------------------------------------------------------
    def _install(self, index: int, full: torch.Tensor) -> None:
        param = self.layout.params[index]
        mark_gathered(param)
        param.data = full
        self._gathered.add(index)

    def _launch(self, indices: list[int], *, async_op: bool) -> None:
        need = [i for i in indices if i not in self._gathered and i not in self._inflight]
        for start, end in self.layout.runs(need):
            part = self.param_store.read(*self.layout.span(start, end))
            handle = gather_slots(layout=self.layout, coll=self.coll, part=part, start=start, end=end,
                                  async_op=async_op)
            for i in range(start, end):
                self._inflight[i] = handle

    def _complete(self, indices) -> None:
        for i in indices:
            handle = self._inflight.get(i)
            if handle is not None:
                handle.finish(self._install)
                for j in range(handle.start, handle.end):
                    self._inflight.pop(j, None)

    def _gather_now(self, indices: list[int]) -> None:
        self._launch(indices, async_op=False)
        self._complete(indices)
        self._note_live()

    def _live(self) -> int:
        """Elements of partitioned parameters gathered or being gathered now."""
        return sum(self.layout.slots[i].numel for i in self._gathered | self._inflight.keys()
                   if i not in self.persistent)

    def _note_live(self) -> None:
        self.peak_live = max(self.peak_live, self._live())

    def _reused_soon(self, module: nn.Module) -> bool:
        """Whether the recorded forward runs `module` again before `max_reuse_distance`
        elements of other modules' parameters are gathered (and keeping it fits the live cap)."""
        if self._recording or self._in_backward or module not in self._position or self.max_reuse_distance <= 0:
            return False
        distance = 0
        for other in self._trace[self._position[module] + 1:]:
            if other is module:
                return self._live() <= self.max_live_parameters
            distance += sum(self.layout.slots[i].numel for i in self._gathers[other])
            if distance > self.max_reuse_distance:
                return False
        return False

    def _release(self, index: int) -> None:
        if index in self.persistent or self._users[index] > 0 or self._held[index] > 0 or index not in self._gathered:
            return
        param = self.layout.params[index]
        param.data = self._released[index]
        mark_released(param, reader=self)
        self._gathered.discard(index)

    def _prefetch(self, order: list[nn.Module]) -> None:
        """Launch the gathers of the next modules, up to `prefetch_bucket_size` elements, and
        ask the store to bring in the partitions of the ones after them (disk reads run ahead
        of the gathers that need them)."""
        budget, reads, room = self.prefetch_bucket_size, [], self.max_live_parameters - self._live()
        table = self.units if self._in_backward else self._gathers  # backward gathers owners only
        for module in order:
            if budget <= (-self.prefetch_bucket_size if self.param_store.reads_ahead else 0):
                break
            need = [i for i in table[module] if i not in self._gathered and i not in self._inflight]
            if not need:
                continue
            numel = sum(self.layout.slots[i].numel for i in need)
            if budget > 0:
                if numel > room:  # max_live_parameters: gather it when it is needed, not ahead
                    break
                self._launch(need, async_op=True)
                room -= numel
            else:
                reads += [self.layout.span(s, e) for s, e in self.layout.runs(need)]
            budget -= numel
        if reads:
            self.param_store.prefetch(reads)
        self._note_live()

    # -- forward hooks ---------------------------------------------------------------------
    def forward_context(self):
        if self._rerecord:  # a module gained an external parameter: record the order again
            self._trace, self._backward_trace, self._position = [], [], {}
            self._recording, self._rerecord = True, False
        self._cursor = 0
        self._running.clear()
        return self.saved_tensors_hooks()

    def saved_tensors_hooks(self):
        """Autograd keeps (parameter, view geometry) for a partitioned parameter, not its storage."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def begin_backward(self, *, boundary: bool) -> None:
        super().begin_backward(boundary=boundary)
        self._in_backward = True
        self._backward_cursor = 0

    def _pre_forward(self, module: nn.Module, args) -> None:
        self._running.append(module)
        slots = self._gathers.get(module)
        if not slots:
            return
        if not self._in_backward:  # not activation checkpointing's recompute
            if self._recording:
                self._trace.append(module)
            self._position[module] = self._cursor
        for i in slots:
            self._users[i] += 1
        self._gather_now(slots)
        if not self._recording and self.prefetch_bucket_size > 0:
            self._prefetch(self._trace[self._cursor + 1:])
        self._cursor += 1

    def _post_forward(self, module: nn.Module, args, output) -> None:
        for k in range(len(self._running) - 1, -1, -1):  # entries above it: forwards cut short
            if self._running[k] is module:
                del self._running[k:]
                break
        slots = self._gathers.get(module)
        if not slots:
            return
        keep = self._reused_soon(module)
        for i in slots:
            self._users[i] -= 1
            if not keep:
                self._release(i)

    # -- parameters used outside their module ------------------------------------------------
    def read_released(self, param: torch.Tensor) -> None:
        """A torch function is about to read released `param` (released.py): gather it inside a
        forward (as an external parameter of the innermost module running) or backward;
        anywhere else raise ParameterNotGathered."""
        index = self.layout.index_of(param)
        if not (self._running or self._in_backward):
            raise ParameterNotGathered(self._not_gathered(index))
        self._gather_now([index])
        if self._running and not self._in_backward:
            module = self._running[-1]
            if index not in self._gathers.setdefault(module, []):
                self._gathers[module].append(index)
                self._users[index] += 1  # its forward's post-hook counts it down
                self._rerecord = True

    def register_external(self, module: nn.Module, param: torch.Tensor) -> None:
        """Gather `param` whenever `module`'s forward runs (DeepSpeed's register_external_parameter)."""
        index = self.layout.index_of(param)
        if index is None or index in self.persistent or index in self._gathers.get(module, ()):
            return
        self._hook(module)
        self._gathers.setdefault(module, []).append(index)
        self._rerecord = True
        if any(m is module for m in self._running):
            self._users[index] += 1
            self._gather_now([index])

    def hold(self, indices: list[int]) -> None:
        """Gather these slots and keep them gathered until `unhold` (a collective)."""
        indices = [i for i in indices if i not in self.persistent]
        self._held.update(indices)
        self._gather_now(indices)

    def unhold(self, indices: list[int]) -> None:
        for i in indices:
            if self._held[i] > 0:
                self._held[i] -= 1
                self._release(i)

    def _not_gathered(self, index: int) -> str:
        names = self._names.get(index) or [self.layout.slots[index].name]
        also = f" (also {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
        return (f"ZeRO-3 parameter {names[0]!r}{also} was read outside the model's forward and backward, where this "
                f"rank holds only its 1/{self.layout.world} shard of it. Read it inside `with zeroplan.gathered(params):` "
                "(entered on every rank; modifier_rank=r to write it), register the module whose forward reads it with "
                "zeroplan.register_external_parameter(module, param), or take the whole model with "
                "engine.consolidated_state_dict() or engine.save_pretrained(directory)")

    # -- backward: saved tensors and gradients -----------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        index = self.layout.index_of(tensor)
        if index is None and tensor._base is not None:
            index = self.layout.index_of(tensor._base)
        if index is None or index in self.persistent:
            return tensor
        param = self.layout.params[index]
        return (index, tensor.size(), tensor.stride(), tensor.storage_offset() - param.storage_offset())

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        index, size, stride, offset = packed
        if index not in self._gathered:
            module = self._home[index]
            self._gather_now(self.units[module])
            if self._recording:
                self._backward_trace.append(module)
            elif self.prefetch_bucket_size > 0:
                self._prefetch(self._backward_next(module))
        param = self.layout.params[index]
        return param.detach().as_strided(size, stride, param.storage_offset() + offset)

    def _backward_next(self, module: nn.Module) -> list[nn.Module]:
        """The modules the recorded backward gathers after `module` (none if it strays from the
        record). Backward is followed by its own trace, not by forward's reversed: a module
        whose backward needs no parameters (an embedding) is never fetched for it."""
        try:
            at = self._backward_trace.index(module, self._backward_cursor)
        except ValueError:
            return []
        self._backward_cursor = at + 1
        return self._backward_trace[at + 1:]

    def on_grad(self, index: int, param: torch.Tensor) -> None:
        self.reducer.mark_ready(index)
        self._release(index)

    def end_backward(self) -> None:
        """After backward no module's forward is running, whatever the hooks counted: a forward
        cut short never decrements its users (torch's non-reentrant checkpoint stops a
        recompute inside the last module once it has every tensor it needs), and a parameter
        kept gathered past this point would be stale after the step."""
        super().end_backward()
        self._in_backward = False
        self._recording = False
        self._users.clear()
        self._running.clear()
        self.release_all()

    def release_all(self) -> None:
        """Finish prefetches still in flight (they are collectives) and release everything not held."""
        self._complete(list(self._inflight))
        for i in list(self._gathered):
            self._release(i)

    # -- step ------------------------------------------------------------------------------
    def publish(self) -> None:
        self.release_all()
        if self.master is not None:
            self.param_store.write(0, self.master)
        held = sorted(i for i, n in self._held.items() if n > 0)
        if held:  # a gathered() block open across the step sees the new values
            self._gathered.difference_update(held)
            self._gather_now(held)
        if self.persistent:
            ranges = [r for s, e in self.layout.runs(sorted(self.persistent))
                      for r in _split(gather_groups(self.layout, self.allgather_bucket_size), s, e)]
            self.gather_into_model(ranges)

    def write_params(self, lo: int, values: torch.Tensor) -> None:
        self.param_store.write(lo, values)

    def publish_parts(self):
        return self.param_store.read

    def close(self) -> None:
        super().close()
        self.param_store.close()


def _split(groups: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) cut at the boundaries of `groups`."""
    out = []
    for s, e in groups:
        lo, hi = max(s, start), min(e, end)
        if lo < hi:
            out.append((lo, hi))
    return out


__all__ = ["Stage3", "ZeroStage"]
