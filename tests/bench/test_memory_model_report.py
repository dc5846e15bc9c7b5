"""bench.memory_model's --from-json: measurements kept in a results file are re-predicted by the
current memory model (the real compiler), so a change to the model is judged on the same
measured rows without re-running them."""

from __future__ import annotations

import json
from dataclasses import asdict

from bench import memory_model
from bench.workload import Workload, compile_plan
from zeroplan.compiler import estimate_memory

MiB = 1 << 20


def _row(preset: str, stage: int, micro: int, peak_mib: int) -> dict:
    return asdict(memory_model.MemoryRow(preset=preset, stage=stage, micro=micro, offload="none",
                                         predicted={"activations": 0}, measured_peak=peak_mib * MiB,
                                         baseline=283 * MiB, after_setup=300 * MiB, step_s=0.1,
                                         setup_peak=300 * MiB, peak_by_step=[320 * MiB, peak_mib * MiB]))


def test_from_json_repredicts_and_reports(tmp_path):
    measured = tmp_path / "memory_model-x.json"
    rows = [_row("tiny", s, m, 360 + 10 * s + m) for s in range(4) for m in (1, 4)]
    measured.write_text(json.dumps({"command": "python -m bench.memory_model --presets tiny", "rows": rows,
                                    "notes": ["offload rows not run: refused"]}))
    out, cal = tmp_path / "report.md", tmp_path / "cal.json"
    got = memory_model.main(["--from-json", str(measured), "--out", str(out), "--calibration-out", str(cal)])

    assert len(got) == 8
    for row in got:
        workload = Workload(preset="tiny", micro_batch_size=row.micro)
        plan = compile_plan(workload, stage=row.stage)
        assert row.predicted == dict(estimate_memory(plan, workload.spec).device)
    text = out.read_text()
    assert "python -m bench.memory_model --presets tiny" in text and "re-predicted by" in text
    assert "offload rows not run: refused" in text and cal.exists()
    assert json.loads(measured.read_text())["rows"] == rows  # the measurements are not rewritten


def test_rows_of_files_written_before_notes_were_kept_still_load(tmp_path):
    old = tmp_path / "old.json"
    row = _row("tiny", 0, 1, 361)
    del row["setup_peak"], row["peak_by_step"]
    old.write_text(json.dumps([row]))
    rows, notes, command = memory_model.load_rows(old)
    assert len(rows) == 1 and notes == [] and command == "" and rows[0].peak_by_step == []
