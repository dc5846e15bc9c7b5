"""bench/step_profile.py end to end: tiny GPT, 2 gloo processes per system, one profiled step
of zeroplan stage 0 beside DDP. Real process groups and the real torch.profiler."""

from __future__ import annotations

from bench import step_profile


def test_profiled_step_side_by_side(tmp_path):
    out = tmp_path / "profile.md"
    step_profile.main(["--preset", "tiny", "--pair", "zeroplan-z0:ddp", "--steps", "2", "--rows", "8",
                       "--out", str(out)])
    text = out.read_text()
    assert "## zeroplan-z0 vs ddp" in text and "- command: `python -m bench.step_profile" in text
    for system in ("zeroplan-z0", "ddp"):
        line = next(x for x in text.splitlines() if x.startswith(f"- {system}: timed step"))
        assert "profiled step" in line and "ms of operator self time" in line
    rows = [x for x in text.splitlines() if x.startswith("| `")]
    assert len(rows) == 8
    differences = [abs(float(r.rstrip(" |").rsplit("|", 1)[1])) for r in rows]
    assert differences == sorted(differences, reverse=True)


def test_rows_order_by_difference_and_count_missing_operators_as_zero():
    from bench.launch import Measurement

    def measured(ops):
        return Measurement(system="s", ranks=[{"profile": {"ops": [{"name": n, "calls": c, "self_ms": t}
                                                                      for n, c, t in ops]}}], wall_s=0.0)
    rows = step_profile.compare_rows(measured([("aten::mm", 10, 50.0), ("aten::copy_", 4, 30.0)]),
                                     measured([("aten::mm", 10, 48.0), ("gloo:all_reduce", 2, 12.0)]), rows=3)
    assert [r[0] for r in rows] == ["`aten::copy_`", "`gloo:all_reduce`", "`aten::mm`"]
    assert rows[0][1:] == [4, "30.0", 0, "0.0", "+30.0"] and rows[1][-1] == "-12.0" and rows[2][-1] == "+2.0"
