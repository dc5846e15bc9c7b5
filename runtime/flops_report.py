"""The FLOPs profiler's report (runtime/flops.py): what one rank counted in one step, laid out
after DeepSpeed's (a summary, the top module classes per depth, the module tree), printed by
rank 0 or written to `output_file` atomically.

Figures: FLOPs as counted (forward, backward, the recompute activation checkpointing really
ran), with the exact count in parentheses; DeepSpeed's estimate (3 + recompute_fwd_factor) x
forward beside them; achieved FLOP/s = counted FLOPs / step latency; MFU = forward and backward
without the recompute / latency / peak (Chowdhery et al. 2022, appendix B), and HFU, the
recompute included, when there is one. The peak is the plan's: the cluster's matmul FLOP/s in
the training dtype, measured by `zeroplan probe` or a preset's datasheet figure.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from zeroplan.compiler.flops import StepFlops
from zeroplan.schemas.atomic import atomic_write_text
from zeroplan.schemas.plan import FlopsProfilerPlan

RULE = "-" * 30


@dataclass(frozen=True)
class ModuleRow:
    name: str
    """FlopCounterMode's name: `<root class>.<qualified name>`; depth is its count of dots."""
    kind: str
    """The module's class."""
    flops: int
    """Forward FLOPs of the module and its children over the step's micro-batches."""
    params: int

    @property
    def depth(self) -> int:
        return self.name.count(".")


@dataclass(frozen=True)
class StepProfile:
    """One rank's count of one optimizer step."""

    step: int
    rank: int
    world_size: int
    dp: int
    tp: int
    pp: int
    micro_batch: int
    micro_steps: int
    dtype: str
    flops: StepFlops
    params: int
    """Parameters this rank holds whole (its tp slice, its pp stage)."""
    modules: list[ModuleRow]
    latency_s: float
    """Wall time of the step, first forward to the end of the optimizer step, counting included."""
    timers_ms: dict[str, float] | None = None
    """Per-phase times when the plan has wall_clock_breakdown."""


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}".rstrip()
    return f"{value:.4g} {unit}".rstrip()


def _line(label: str, value: str) -> str:
    return f"{label + ':':<58} {value}"


def summary(p: StepProfile, *, plan: FlopsProfilerPlan) -> list[str]:
    f, seconds = p.flops, p.latency_s
    recompute = "counted as activation checkpointing ran it" if f.recompute else "none ran"
    lines = [
        f"Profile of step {p.step} on rank {p.rank} of {p.world_size} (dp {p.dp}, tp {p.tp}, pp {p.pp}): "
        f"{p.micro_steps} micro-batch(es) of {p.micro_batch} per rank",
        "FLOPs: matrix products counted by torch's FlopCounterMode on this rank, 2 per multiply-add",
        "",
        _line("parameters on this rank", f"{_si(p.params, '')} ({p.params})"),
        _line("forward FLOPs", f"{_si(f.forward, 'FLOP')} ({f.forward})"),
        _line("backward FLOPs", f"{_si(f.backward, 'FLOP')} ({f.backward})"),
        _line("recomputed forward FLOPs", f"{_si(f.recompute, 'FLOP')} ({f.recompute}): {recompute}"),
        _line("total FLOPs per step on this rank", f"{_si(f.total, 'FLOP')} ({f.total})"),
        _line(f"DeepSpeed's estimate, (3 + recompute_fwd_factor {plan.recompute_fwd_factor:g}) x forward",
              _si((3 + plan.recompute_fwd_factor) * f.forward, "FLOP")),
        _line("step latency (counting included)", f"{seconds * 1000:.2f} ms"),
    ]
    if p.timers_ms:
        lines.append(_line("latency by phase", " | ".join(f"{k} {v:.2f} ms" for k, v in p.timers_ms.items())))
    if seconds <= 0:
        return lines + [_line("achieved FLOP/s", "not measured (no step time)")]
    peak = f"of {_si(plan.peak_flops, 'FLOP/s')} peak ({p.dtype} matmul, {plan.peak_source})"
    lines += [_line("achieved FLOP/s, total / step latency", _si(f.total / seconds, "FLOP/s")),
              _line("MFU, forward + backward / latency / peak", f"{100 * f.model / seconds / plan.peak_flops:.2f}% {peak}")]
    if f.recompute:
        lines.append(_line("HFU, recompute included", f"{100 * f.total / seconds / plan.peak_flops:.2f}% {peak}"))
    return lines


def top_modules(p: StepProfile, *, plan: FlopsProfilerPlan) -> list[str]:
    """The `top_modules` classes with the most forward FLOPs at each depth, summed over their
    modules (DeepSpeed's aggregated profile groups by class too)."""
    by_depth: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in p.modules:
        if plan.module_depth < 0 or row.depth <= plan.module_depth:
            totals = by_depth[row.depth][row.kind]
            totals[0] += row.flops
            totals[1] += row.params
    lines = [f"Top {plan.top_modules} module classes by forward FLOPs at each depth (summed over the class's "
             "modules):"]
    for depth in sorted(by_depth):
        ranked = sorted(by_depth[depth].items(), key=lambda item: -item[1][0])[:plan.top_modules]
        lines.append(f"depth {depth}: " + ", ".join(f"{kind} {_si(flops, 'FLOP')} ({_si(params, '')} params)"
                                                    for kind, (flops, params) in ranked))
    return lines


def module_tree(p: StepProfile, *, plan: FlopsProfilerPlan) -> list[str]:
    """Every module to `module_depth`: forward FLOPs, share of the step's forward, parameters."""
    total = p.flops.forward or 1
    lines = ["Per module: forward FLOPs over the step's micro-batches, % of the forward, parameters "
             "(backward runs 2x a product's forward, 2.5x fused attention's)"]
    for row in p.modules:
        if plan.module_depth >= 0 and row.depth > plan.module_depth:
            continue
        label = "  " * row.depth + (row.name.rsplit(".", 1)[-1] if row.depth else row.name)
        if row.depth:
            label += f" ({row.kind})"
        lines.append(f"{label:<48} {_si(row.flops, 'FLOP'):>14} {100 * row.flops / total:7.2f}% "
                     f"{_si(row.params, ''):>8} params")
    return lines


def render(p: StepProfile, *, plan: FlopsProfilerPlan) -> str:
    parts = [f"{RULE} zeroplan FLOPs profiler {RULE}", *summary(p, plan=plan), "", *top_modules(p, plan=plan)]
    if plan.detailed:
        parts += ["", *module_tree(p, plan=plan)]
    return "\n".join([*parts, "-" * 84]) + "\n"


def emit(p: StepProfile, *, plan: FlopsProfilerPlan, output_file: str | None) -> None:
    """Print the report, or write it to `output_file` (a temp file renamed over it)."""
    text = render(p, plan=plan)
    if output_file:
        atomic_write_text(output_file, text)
    else:
        print(text, end="", flush=True)
