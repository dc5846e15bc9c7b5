"""The throughput benchmark end to end in its quickest form: tiny GPT, 2 gloo processes per
system, 3 steps, zeroplan stage 0 against DDP. Real process groups, nothing mocked."""

from __future__ import annotations

import dataclasses

from bench import throughput


def test_quick_throughput_table_and_losses(tmp_path):
    out = tmp_path / "throughput.md"
    results = throughput.main(["--presets", "tiny", "--systems", "zeroplan-z0", "ddp", "--steps", "3",
                               "--warmup", "1", "--reps", "1", "--out", str(out)])

    assert len(results) == 1
    rows = {r.system: r for r in results[0].rows}
    assert set(rows) == {"zeroplan-z0", "ddp"}
    for row in rows.values():
        assert [f.name for f in dataclasses.fields(row)] == throughput.COLUMNS
        assert row.samples_per_s > 0 and row.peak_rss_bytes > 0 and row.rounds == 1
    # Same weights, same data, same AdamW: only summation order differs (LOSS_TOLERANCE says why).
    z0, ddp = rows["zeroplan-z0"], rows["ddp"]
    assert abs(z0.loss_first - ddp.loss_first) <= throughput.LOSS_TOLERANCE
    assert abs(z0.loss_last - ddp.loss_last) <= throughput.LOSS_TOLERANCE
    assert z0.loss_agrees and ddp.ratio_vs_ddp == 1.0

    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| system |"))
    for column in ("samples/s", "vs DDP", "peak RSS/rank MiB", "loss step 3", "Δloss vs DDP", "agrees"):
        assert f"| {column} |" in header
    assert "- CPU:" in text and "- command: `python -m bench.throughput" in text
    assert out.with_suffix(".json").exists()
    # Head to head, paired by round: zeroplan-z0 against DDP (both ran), one ratio per round.
    (pair,) = results[0].pairs
    assert (pair.system, pair.peer) == ("zeroplan-z0", "ddp") and len(pair.throughput_ratios) == 1
    assert pair.throughput_ratios[0] > 0 and pair.rss_ratio == z0.peak_rss_bytes / ddp.peak_rss_bytes
    assert "Head to head" in text and "load average (1 min)" in text and len(results[0].load) == 2
