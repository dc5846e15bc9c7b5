"""The metrics file's records: written as the runtime writes them, read back as the tuner reads them."""

from __future__ import annotations

import math

import pytest

from zeroplan.schemas import ConfigError
from zeroplan.schemas.steps import (FailureRecord, MetricsTail, StepRecord, SummaryRecord, read_records,
                                    read_summary)


def test_every_kind_round_trips_through_the_file(tmp_path):
    path = tmp_path / "m.jsonl"
    written = [StepRecord(step=1, step_time_s=0.5, loss=2.5, peak_rss_bytes=100, comms={"all_reduce": {"count": 2,
                                                                                                     "bytes": 64}}),
               StepRecord(step=2, step_time_s=0.4, loss=float("nan"), skipped=True, max_memory_reserved_bytes=300,
                          peak_rss_bytes=100),
               SummaryRecord(steps=2, mean_step_time_s=0.4, peak_rss_bytes_per_rank=[100, 120]),
               FailureRecord(rank=1, kind="crash", cause="rank 1: killed by SIGSEGV", detail="frames")]
    path.write_text("".join(r.to_line() for r in written))
    first, second, summary, failure = read_records(path)
    assert first == written[0] and first.comms["all_reduce"].bytes == 64 and first.peak_memory_bytes == 100
    assert math.isnan(second.loss) and second.skipped and second.peak_memory_bytes == 300
    assert summary == written[2] and summary.peak_memory_bytes == 120 and read_summary(path) == summary
    assert failure == written[3]


def test_a_line_without_optional_fields_is_written_as_before(tmp_path):
    assert StepRecord(step=3, step_time_s=0.25).to_line() == '{"step":3,"step_time_s":0.25,"skipped":false}\n'


@pytest.mark.parametrize("line, key, message", [
    ('{"step": 1, "step_time_s": 0.1}\n{"step": 2, "loss": 1.0}\n', "step_time_s", "Field required"),
    ('{"step": 1, "step_time_s": 0.1}\n{"step": 2, "step_time_s": 0.1, "los": 1.0}\n', "los", "Extra inputs"),
    ('{"step": 1, "step_time_s": 0.1}\n{"step": 2, "step_time_s": \n', "", "not a JSON object"),
    ('{"step": 1, "step_time_s": 0.1}\n[1, 2]\n', "", "expected a JSON object"),
    ('{"step": 1, "step_time_s": 0.1}\n{"failure": true, "kind": "crash"}\n', "cause", "in a FailureRecord"),
])
def test_a_malformed_line_names_the_file_line_and_key(tmp_path, line, key, message):
    path = tmp_path / "m.jsonl"
    path.write_text(line)
    with pytest.raises(ConfigError) as e:
        read_records(path)
    assert e.value.source == f"{path}, line 2"
    assert e.value.problems[0].path == key and message in e.value.problems[0].message


def test_the_tail_leaves_a_line_being_written_for_the_next_read(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []  # not created yet
    path.write_text('{"step": 1, "step_time_s": 0.1}\n{"step": 2, "step_')
    assert [r.step for r in tail.read_new()] == [1]
    with path.open("a") as f:
        f.write('time_s": 0.2}\n\n{"step": 3, "step_time_s": 0.3}\n')
    assert [r.step for r in tail.read_new()] == [2, 3]
    with path.open("a") as f:
        f.write('{"step": 4, "step_time_s": "0.4"}\n')
    with pytest.raises(ConfigError, match=r"line 5") as e:  # counted across reads, the blank line too
        tail.read_new()
    assert e.value.problems[0].path == "step_time_s"  # a number as a string is not coerced


def test_a_run_that_did_not_finish_has_no_summary(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(FailureRecord(kind="oom", cause="rank 0: out of memory").to_line())
    with pytest.raises(ConfigError, match="the last line is FailureRecord"):
        read_summary(path)
