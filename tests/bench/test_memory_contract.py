"""The plan's memory prediction is what the runtime holds: the small preset trained by
zeroplan's runtime on 2 gloo processes (bench/memory_model.py's measurement: peak RSS per rank,
VmHWM, max over ranks) is within the model's stated error (`TARGET`, 10%) of the plan's
per-rank peak, uncalibrated. The fixed start-up part (interpreter, torch and the packages this
environment installed, the process group) is taken as measured, as `zeroplan probe` measures it
for a cluster file: it depends on the installed versions, not on the plan. Two rows that
exercise different peaks: ZeRO-2 with activation checkpointing (the loss's backward beside the
stored block inputs; the bucket reduction close behind) and ZeRO-3 without (ZeRO-3's gathered
parameters beside every stored activation, the model built whole first). The full matrix, with
the medium preset, is `python -m bench.memory_model` (bench/results)."""

from __future__ import annotations

import pytest

from bench.memory_model import TARGET, measure_row
from zeroplan.compiler.memory import runtime_overhead


@pytest.mark.parametrize("stage, checkpointing", [(2, True), (3, False)])
def test_peak_memory_per_rank_is_within_the_stated_error(stage, checkpointing):
    row = measure_row("small", stage, 4, checkpointing=checkpointing)
    overhead = runtime_overhead(device="cpu", measured=row.baseline)
    predicted = row.predicted_total - row.predicted["overhead"] + overhead
    error = (predicted - row.measured_peak) / row.measured_peak
    assert abs(error) <= TARGET, (
        f"predicted {predicted >> 20} MiB (start-up {row.baseline >> 20} MiB measured), measured "
        f"{row.measured_peak >> 20} MiB ({100 * error:+.1f}%): {row.predicted}")
