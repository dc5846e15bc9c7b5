"""DeepSpeed's flops_profiler: the FLOPs one optimizer step really runs on this rank, counted by
torch's FlopCounterMode at the plan's `profile_step`, reported by rank 0 with the step's
latency, achieved FLOP/s and MFU against the cluster's peak (flops_report.py).

Window: the counter is entered when step `profile_step - 1` ends (at set-up for step 1) and left
when step `profile_step` ends, so it sees that step's forwards, backwards and optimizer step
(which has no matrix products), on every rank: each counts its own share under tp and pp and
runs as slowly as the others. A run resumed from a checkpoint at step `profile_step - 1` or
later is not profiled.

What is counted: FlopCounterMode's formulas (matrix products, 2 FLOPs per multiply-add; the
CUDA attention kernels), plus torch's own attention formulas for the CPU flash-attention
kernel, which its registry does not list. Each formula also adds its count to the phase the op
ran in: forward outside backward; inside backward, a recomputed forward when grad mode is on
(torch's checkpoint recomputes under enable_grad; so does a model's own use of it), backward
otherwise (autograd runs backward functions with grad mode off, as Engine.backward asks, with no
create_graph). So with activation checkpointing the recompute is counted as it really runs,
where DeepSpeed, which counts forwards only, estimates backward as (2 + recompute_fwd_factor) x
forward; the report prints that estimate beside the count.

Numerics: FlopCounterMode dispatches every op to the kernel it would have run and its module
hooks only record names, so the profiled step computes what an unprofiled one does (a test
compares the parameters after it). Its Python dispatch per op does slow the step it counts:
the reported latency includes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from zeroplan.compiler.flops import StepFlops
from zeroplan.schemas.plan import FlopsProfilerPlan

from .flops_report import ModuleRow, StepProfile, emit

PHASES = ("forward", "backward", "recompute")


def _phase() -> str:
    """The pass the current op runs in (see the module docstring). -1 is the graph task id
    outside any backward; torch.utils.checkpoint reads it the same way."""
    if torch._C._current_graph_task_id() == -1:
        return "forward"
    return "recompute" if torch.is_grad_enabled() else "backward"


def _cpu_attention_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def phased_counter(phases: dict[str, int]) -> FlopCounterMode:
    """A FlopCounterMode whose formulas add every op's FLOPs into `phases` and leave it the
    forward's only, attributed per module. torch's module tracker keeps the modules an op runs
    in as a set entered and left by hooks; a checkpointed block recomputed inside its own
    backward leaves it early, so backward attribution goes astray there while the forward's
    nests exactly (DeepSpeed's per-module profile is the forward's too). `flop_registry` is
    the mode's own table of formulas (torch 2.4 on, as pyproject allows); the test that each
    phase equals the analytic figure holds it to that."""
    aten = torch.ops.aten
    mode = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward})

    def phased(formula: Callable[..., int]) -> Callable[..., int]:
        def count(*args, **kwargs) -> int:
            flops, phase = formula(*args, **kwargs), _phase()
            phases[phase] += flops
            return flops if phase == "forward" else 0
        return count

    mode.flop_registry = {op: phased(formula) for op, formula in mode.flop_registry.items()}
    return mode


def module_rows(model: nn.Module, *, counts: dict[str, dict], numel: Callable[[nn.Parameter], int]) -> list[ModuleRow]:
    """Every module of `model` in tree order with its forward FLOPs and parameters; counted
    modules outside `model` (a pipeline stage's own wrappers) follow. FlopCounterMode names a
    module `<root class>.<qualified name>`. A container never called itself (a ModuleList) has
    no count of its own and shows its children's sum."""
    rows: list[ModuleRow | None] = []

    def visit(key: str, module: nn.Module) -> int:
        index = len(rows)
        rows.append(None)
        children = sum(visit(f"{key}.{name}", child) for name, child in module.named_children())
        flops = max(sum(counts.get(key, {}).values()), children)
        rows[index] = ModuleRow(name=key, kind=type(module).__name__, flops=flops,
                                params=sum(numel(p) for p in module.parameters()))
        return flops

    visit(type(model).__name__, model)
    known = {row.name for row in rows}
    rows += [ModuleRow(name=key, kind=key.rsplit(".", 1)[-1], flops=sum(ops.values()), params=0)
             for key, ops in sorted(counts.items()) if key != "Global" and key not in known]
    return rows


class FlopsProfiler:
    """One rank's profiler; `__init__` stores. `arm` before the profiled step, `on_step` after
    every step, `close` at the end. `profile` holds the counted step once it is done."""

    def __init__(self, *, plan: FlopsProfilerPlan, rank: int):
        self.plan, self.rank = plan, rank
        self.profile: StepProfile | None = None
        self._mode: FlopCounterMode | None = None
        self._phases: dict[str, int] = {}

    def arm(self, *, steps_done: int) -> None:
        """Start counting if the next step is the profiled one."""
        if steps_done == self.plan.profile_step - 1 and self._mode is None and self.profile is None:
            self._phases = dict.fromkeys(PHASES, 0)
            self._mode = phased_counter(self._phases)
            self._mode.__enter__()

    def on_step(self, engine, *, timers: dict[str, float] | None) -> None:
        """After an optimizer step: stop counting and report if it was the profiled one."""
        if self._mode is not None:
            counts = self._stop()
            if engine.global_steps == self.plan.profile_step:
                self.profile = self._measure(engine, counts=counts, timers=timers)
                if self.rank == 0:
                    emit(self.profile, plan=self.plan, output_file=self.plan.output_file)
        self.arm(steps_done=engine.global_steps)

    def close(self) -> None:
        if self._mode is not None:
            self._stop()

    def _stop(self) -> dict[str, dict]:
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        return mode.get_flop_counts()

    def _measure(self, engine, *, counts: dict[str, dict], timers: dict[str, float] | None) -> StepProfile:
        layout = engine.zero.layout

        def numel(p: nn.Parameter) -> int:  # ZeRO-3 releases parameters: the layout keeps their size
            index = layout.index_of(p)
            return layout.slots[index].numel if index is not None else p.numel()

        g = engine.groups
        return StepProfile(
            step=engine.global_steps, rank=g.rank, world_size=g.world_size, dp=g.dp_size, tp=g.tp_size,
            pp=g.pp_size, micro_batch=engine.plan.batch.micro_batch_size, micro_steps=engine.accumulation,
            dtype=engine.plan.precision.param_dtype, flops=StepFlops(**self._phases),
            params=sum(numel(p) for p in engine.module.parameters()),
            modules=module_rows(engine.module, counts=counts, numel=numel),
            latency_s=engine.meter.summary().get("step_time_s", 0.0), timers_ms=timers)


__all__ = ["FlopsProfiler", "module_rows", "phased_counter"]
