"""Memory-model accuracy: the compiler's predicted per-rank peak against the measured peak RSS.

For each plan of the matrix (ZeRO stage x micro-batch x preset, 2 CPU ranks) the plan is
compiled as in `python -m bench.throughput`, run by zeroplan's runtime for a few steps in a
fresh process group, and its peak RSS (VmHWM, max over ranks) compared with
`compiler.memory.estimate_memory(plan, model).device_total` (on CPU the "device" is host
memory). Two measured splits say which category is off:
- model states: RSS after `initialize` minus RSS before the model was built, against the
  predicted parameters + gradients + optimizer states + master weights;
- training: peak RSS minus RSS after `initialize`, against predicted activations + buffers.

From the measurements a calibration (compiler/calibration.py's format) is fitted and written to
bench/results/calibration-cpu.json: one scale each for the model states, activations and
communication buffers, and the fixed bytes every run holds (`overhead`, an offset), fitted by
non-negative least squares. Each row's calibrated error is given in-sample and leave-one-out
(fitted without that row), so the fit is not judged only on the data it saw.

Usage: python -m bench.memory_model [--presets tiny small] [--stages 0 1 2 3] [--micro 1 4]
       [--activation-checkpointing off|on|both] [--no-offload] [--budget-s S] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from zeroplan.compiler import Calibration, estimate_memory
from zeroplan.compiler.memory import RUNTIME_OVERHEAD

from .budget import STARTUP_S, Budget, work_per_sample
from .launch import LaunchError, start_main, launch
from .report import RESULTS, machine_lines, mib, result_path, table, write
from .systems.zeroplan import Zeroplan
from .workload import Workload, compile_plan

STATES = ("parameters", "gradients", "optimizer_states", "master_weights")
TARGET = 0.10
"""The accuracy asked of the model: |predicted - measured| / measured on every row."""
STEPS = 2


@dataclass
class MemoryRow:
    preset: str
    stage: int
    micro: int
    offload: str
    predicted: dict[str, int]
    """The compiler's bytes per rank by category."""
    measured_peak: int
    baseline: int
    """RSS before the model was built: interpreter, torch, the process group."""
    after_setup: int
    step_s: float
    """Median step time on rank 0 (to size the next rows against the budget)."""
    setup_peak: int = 0
    """High-water mark once the system was set up (0 in files written before it was recorded)."""
    peak_by_step: list[int] = field(default_factory=list)
    """High-water mark after each step, max over ranks."""
    checkpointing: bool = False
    """The plan recomputed each block in backward (activation checkpointing)."""

    @property
    def predicted_total(self) -> int:
        return sum(self.predicted.values())

    @property
    def error(self) -> float:
        return (self.predicted_total - self.measured_peak) / self.measured_peak

    @property
    def predicted_states(self) -> int:
        return sum(self.predicted[k] for k in STATES)

    @property
    def measured_states(self) -> int:
        return self.after_setup - self.baseline

    @property
    def predicted_training(self) -> int:
        return self.predicted["activations"] + self.predicted["comm_buffers"]

    @property
    def measured_training(self) -> int:
        return self.measured_peak - self.after_setup


def measure_row(preset: str, stage: int, micro: int, offload: str = "none", checkpointing: bool = False) -> MemoryRow:
    workload = Workload(preset=preset, micro_batch_size=micro, steps=STEPS, warmup=0,
                        activation_checkpointing=checkpointing)
    plan = compile_plan(workload, stage=stage, offload=offload)
    name = f"zeroplan-z{stage}" + ("" if offload == "none" else f"-offload-{offload}")
    m = launch(name, workload)
    return MemoryRow(preset=preset, stage=stage, micro=micro, offload=offload, checkpointing=checkpointing,
                     predicted=dict(estimate_memory(plan, workload.spec).device),
                     measured_peak=max(r["peak_rss_bytes"] for r in m.ranks),
                     baseline=max(r["baseline_rss_bytes"] for r in m.ranks),
                     after_setup=max(r["after_setup_rss_bytes"] for r in m.ranks),
                     step_s=statistics.median(m.ranks[0]["step_times_s"]),
                     setup_peak=max(r["setup_peak_rss_bytes"] for r in m.ranks),
                     peak_by_step=[max(ps) for ps in zip(*(r["peak_by_step"] for r in m.ranks))])


def repredict(row: MemoryRow) -> MemoryRow:
    """`row` with the current model's prediction (its measurements unchanged)."""
    workload = Workload(preset=row.preset, micro_batch_size=row.micro, steps=STEPS, warmup=0,
                        activation_checkpointing=row.checkpointing)
    plan = compile_plan(workload, stage=row.stage, offload=row.offload)
    return MemoryRow(**{**asdict(row), "predicted": dict(estimate_memory(plan, workload.spec).device)})


def load_rows(path: Path) -> tuple[list[MemoryRow], list[str], str]:
    """Rows, notes and command of an earlier run (a memory_model-*.json; files written before
    notes were kept hold only rows), re-predicted by the current model."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        data = {"rows": data, "notes": [], "command": ""}
    return [repredict(MemoryRow(**r)) for r in data["rows"]], data["notes"], data["command"]


def offload_support() -> str | None:
    """None when the runtime runs an optimizer-offload plan, else why not (its own error)."""
    try:
        measure_row("tiny", 1, 1, "cpu")
    except LaunchError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return lines[-1].strip().lstrip("- ") if lines else str(e)
    return None


# -- calibration ---------------------------------------------------------------------------
def _features(row: MemoryRow) -> list[float]:
    return [row.predicted_states, row.predicted["activations"], row.predicted["comm_buffers"], 1.0]


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (drop the most negative one and refit; 4 unknowns)."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        if active:
            coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda i: coef[i]))


def fit(rows: list[MemoryRow], *, source: str) -> Calibration:
    """measured peak ~ s1 * states + s2 * activations + s3 * buffers + fixed, by non-negative least
    squares; the fixed bytes (start-up RSS plus what every run allocates whatever its plan) become
    the `overhead` category."""
    x = np.array([_features(r) for r in rows], dtype=float)
    y = np.array([r.measured_peak for r in rows], dtype=float)
    states, activations, buffers, overhead = _nnls(x, y)
    device = {k: {"scale": round(float(states), 4)} for k in STATES}
    device["activations"] = {"scale": round(float(activations), 4)}
    device["comm_buffers"] = {"scale": round(float(buffers), 4)}
    device["overhead"] = {"offset_bytes": int(overhead) - RUNTIME_OVERHEAD["cpu"]}
    return Calibration.model_validate({"source": source, "device": device})


def calibrated_error(row: MemoryRow, calibration: Calibration) -> float:
    device, _ = calibration.apply(row.predicted, {})
    return (sum(device.values()) - row.measured_peak) / row.measured_peak


def leave_one_out(rows: list[MemoryRow], *, source: str) -> list[float | None]:
    if len(rows) < 5:
        return [None] * len(rows)
    return [calibrated_error(r, fit(rows[:i] + rows[i + 1:], source=source)) for i, r in enumerate(rows)]


# -- running and reporting -------------------------------------------------------------------
def run(*, presets: list[str], stages: list[int], micros: list[int], budget: Budget, offload: bool = True,
        checkpointing: tuple[bool, ...] = (False,), log=print) -> tuple[list[MemoryRow], list[str]]:
    rows: list[MemoryRow] = []
    notes: list[str] = []
    if offload:
        log("[memory] checking optimizer offload support")
        reason = offload_support()
        if reason:
            notes.append(f"offload_optimizer cpu rows not run: the runtime refuses them ({reason})")
    unit_s = 0.3  # seconds per rank-sample of tiny-preset work; re-measured by every row
    for preset in sorted(presets, key=work_per_sample):
        scale = work_per_sample(preset) / work_per_sample("tiny")
        for stage, micro, ac in ((s, m, a) for s in stages for m in micros for a in checkpointing):
            what = f"{preset} stage {stage} micro {micro}" + (" checkpointing" if ac else "")
            cost = STARTUP_S + STEPS * micro * unit_s * scale * (1.3 if ac else 1.0)
            if not budget.fits(cost):
                notes.append(f"{what} not run: ~{cost:.0f}s did not fit the budget")
                continue
            log(f"[memory] {what}")
            try:
                rows.append(measure_row(preset, stage, micro, checkpointing=ac))
                unit_s = rows[-1].step_s / (micro * scale * (1.3 if ac else 1.0))
            except LaunchError as e:
                notes.append(f"{what} failed: {str(e).strip().splitlines()[-1]}")
    return rows, notes


def to_markdown(rows: list[MemoryRow], notes: list[str], calibration: Calibration | None,
                loo: list[float | None], *, command: str, calibration_path: str = "") -> list[str]:
    lines = ["# Memory-model accuracy (CPU, peak RSS per rank)", "", *machine_lines({}),
             f"- command: `{command}`",
             f"- 2 processes, gloo, fp32, AdamW, zeroplan's runtime running the compiled plan for {STEPS} steps; "
             "measured = peak RSS (VmHWM, the process's high-water mark; bench/worker.py says why not "
             "ru_maxrss), max over ranks; predicted = `estimate_memory(plan, model).device_total`; "
             "error = (predicted - measured) / measured; target |error| <= 10% on every row",
             "- split: states = RSS after `initialize` - RSS before the model was built (predicted: parameters + "
             "gradients + optimizer states + master weights); training = peak - RSS after `initialize` "
             "(predicted: activations + communication buffers); startup = RSS before the model was built "
             f"(predicted: overhead, {mib(RUNTIME_OVERHEAD['cpu'])} MiB, of which ~30 MiB are the first steps' "
             "allocations that do not scale with the model, so the training column's measured side includes them)",
             ""]
    body = []
    for r, l in zip(rows, loo):
        cal = calibrated_error(r, calibration) if calibration else None
        body.append([r.preset, r.stage, r.micro, "on" if r.checkpointing else "off", mib(r.predicted_total), mib(r.measured_peak), f"{100 * r.error:+.1f}%",
                     "yes" if abs(r.error) <= TARGET else "**no**",
                     f"{mib(r.predicted_states)} / {mib(r.measured_states)}",
                     f"{mib(r.predicted_training)} / {mib(r.measured_training)}",
                     f"{mib(r.predicted['overhead'])} / {mib(r.baseline)}",
                     "-" if cal is None else f"{100 * cal:+.1f}%", "-" if l is None else f"{100 * l:+.1f}%"])
    lines += table(["preset", "stage", "micro", "checkpointing", "predicted MiB", "measured MiB", "error", "within 10%",
                    "states pred / meas", "training pred / meas", "startup pred / meas", "calibrated error",
                    "calibrated, leave-one-out"], body, right=[False, True, True, False] + [True] * 9)
    if rows:
        errs = [abs(r.error) for r in rows]
        lines += ["", f"- overall: mean |error| {100 * statistics.mean(errs):.1f}%, worst {100 * max(errs):.1f}%, "
                  f"{sum(e <= TARGET for e in errs)} of {len(rows)} rows within 10%"]
        if calibration is not None:
            cal = [abs(calibrated_error(r, calibration)) for r in rows]
            lines.append(f"- calibrated (in-sample): mean |error| {100 * statistics.mean(cal):.1f}%, worst "
                         f"{100 * max(cal):.1f}%, {sum(e <= TARGET for e in cal)} of {len(rows)} within 10%")
            if loo[0] is not None:
                lo = [abs(e) for e in loo]
                lines.append(f"- calibrated (leave-one-out): mean |error| {100 * statistics.mean(lo):.1f}%, worst "
                             f"{100 * max(lo):.1f}%, {sum(e <= TARGET for e in lo)} of {len(rows)} within 10%")
            lines += ["", f"Calibration written to `{calibration_path}`:", "", "```json",
                      calibration.model_dump_json(indent=1), "```"]
    lines += [""] + [f"- {n}" for n in notes]
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "medium"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--micro", nargs="+", type=int, default=[1, 4])
    p.add_argument("--no-offload", action="store_true", help="do not try the offload_optimizer cpu rows")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", default=None, help="markdown file (default: bench/results/memory_model-DATE.md)")
    p.add_argument("--calibration-out", default=str(RESULTS / "calibration-cpu.json"))
    p.add_argument("--activation-checkpointing", choices=["off", "on", "both"], default="off",
                   help="rows with the plan's activation checkpointing off, on, or one of each")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="measure nothing: re-predict the rows of an earlier memory_model-*.json with the current "
                        "model and write the report (the measurements are the file's)")
    return p


def main(argv: list[str] | None = None, *, budget: Budget | None = None, command: str | None = None) -> list[MemoryRow]:
    """`budget` and `command` are given when `python -m bench` runs this section."""
    args = parser().parse_args(argv)
    given, log = start_main("bench.memory_model", argv)
    command = command or given
    if args.from_json:
        rows, notes, measured_by = load_rows(Path(args.from_json))
        command = f"{measured_by}`, re-predicted by `{command.strip()}" if measured_by else command
    else:
        checkpointing = {"off": (False,), "on": (True,), "both": (False, True)}[args.activation_checkpointing]
        rows, notes = run(presets=args.presets, stages=args.stages, micros=args.micro, checkpointing=checkpointing,
                          offload=not args.no_offload, budget=budget or Budget(args.budget_s), log=log)
    path = Path(args.out) if args.out else result_path("memory_model")
    if not args.from_json:
        raw = {"command": command.strip(), "rows": [asdict(r) for r in rows], "notes": notes}
        path.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    calibration, loo = None, [None] * len(rows)
    if len(rows) >= 4:
        calibration = fit(rows, source=str(path.relative_to(RESULTS.parent.parent)) if path.is_relative_to(
            RESULTS.parent.parent) else str(path))
        loo = leave_one_out(rows, source=calibration.source)
        Path(args.calibration_out).write_text(calibration.model_dump_json(indent=2) + "\n")
    else:
        notes = notes + ["too few rows measured to fit a calibration"]
    checkout = RESULTS.parent.parent
    shown = Path(args.calibration_out).resolve()
    shown = shown.relative_to(checkout) if shown.is_relative_to(checkout) else shown
    write(path, to_markdown(rows, notes, calibration, loo, command=command.strip(), calibration_path=str(shown)))
    print(path.read_text())
    log(f"written to {path}")
    return rows


if __name__ == "__main__":
    main()
