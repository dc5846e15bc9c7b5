"""The plan's memory prediction is what the runtime holds: the small preset trained by
zeroplan's runtime on 2 gloo processes (bench/memory_model.py's measurement: peak RSS per rank,
VmHWM, max over ranks) is within the model's stated error (`TARGET`, 10%) of
`estimate_memory(plan, model).device_total`, uncalibrated. Two rows that exercise different
peaks: ZeRO-2 with activation checkpointing (the loss's backward beside the stored block inputs;
the bucket reduction close behind) and ZeRO-3 without (ZeRO-3's gathered parameters beside
every stored activation, the model built whole first). The full matrix, with the medium preset,
is `python -m bench.memory_model` (bench/results)."""

from __future__ import annotations

import pytest

from bench.memory_model import TARGET, measure_row


@pytest.mark.parametrize("stage, checkpointing", [(2, True), (3, False)])
def test_peak_memory_per_rank_is_within_the_stated_error(stage, checkpointing):
    row = measure_row("small", stage, 4, checkpointing=checkpointing)
    assert abs(row.error) <= TARGET, (
        f"predicted {row.predicted_total >> 20} MiB, measured {row.measured_peak >> 20} MiB "
        f"({100 * row.error:+.1f}%): {row.predicted}")
