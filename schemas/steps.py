"""The metrics file: one JSON object per line, written by the runtime, read by the tuner.

`zeroplan train PLAN --metrics FILE` (runtime/train.py for the built-in loop, the Engine's
StepReporter for a script) has rank 0 append three kinds of line:

- a `StepRecord` after every optimizer step, steps counted from 1:
  `{"step": 3, "step_time_s": 0.41, "loss": 2.93, "samples_per_s": 19.5, "peak_rss_bytes": 123456, ...}`
- a `SummaryRecord` at the end of a run that finished, with every rank's peak memory:
  `{"summary": true, "steps": 20, "mean_step_time_s": 0.4, "peak_rss_bytes_per_rank": [...], ...}`
- a `FailureRecord`, appended by `zeroplan train` when the run failed (runtime/diagnose.py):
  `{"failure": true, "rank": 1, "kind": "crash", "cause": "rank 1: killed by SIGSEGV ...", "detail": "..."}`

The autotuner (autotune/runner.py), bench/ and the tests read the file back through
`parse_record` / `read_records`. The file is untrusted input (it may come from any script
and be cut short by a kill): a line that is not one of these records is a ConfigError naming
the file, the line and the key. A non-finite loss is written as JSON's `NaN`/`Infinity`
(Python's json does), so the tuner can fail a diverged trial at once.

Torch-free: the tuner, which never imports torch, reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import NOT_GIVEN, ConfigError, Problem

Bytes = int
Seconds = float


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, ser_json_inf_nan="constants",
                              use_attribute_docstrings=True)

    def to_line(self) -> str:
        """The record as one line of the metrics file (fields left as None are not written)."""
        return self.model_dump_json(exclude_none=True) + "\n"


class CommCount(_Record):
    """Calls and bytes of one collective in a step (runtime/comm.py's CommsLogger)."""

    count: int = Field(ge=0)
    bytes: Bytes = Field(ge=0)
    """The full (unsharded) message, as DeepSpeed's comms logger counts it."""


class StepRecord(_Record):
    """Rank 0's account of one optimizer step."""

    step: int = Field(ge=0)
    """The optimizer step this line is about, counted from 1."""
    step_time_s: Seconds = Field(ge=0)
    """Wall clock of the step, from its first forward to the end of its optimizer step, the
    device synchronised (runtime/metrics.py's StepMeter)."""
    loss: float | None = None
    """The step's loss averaged over the dp ranks (with pp > 1 the last stage's); may be
    NaN or inf; None when the engine saw no loss (a script that never called it)."""
    skipped: bool = False
    """True when the step was skipped as non-finite (`precision.nonfinite: skip`, fp16's scaler)."""
    lr: float | None = None
    """The first param group's learning rate for the next step (the built-in loop writes it)."""
    samples_per_s: float | None = None
    """The plan's global batch divided by step_time_s."""
    tokens_per_s: float | None = None
    mean_step_time_s: Seconds | None = None
    """Mean over the steps timed so far, warm-up included."""
    steps_timed: int | None = None
    rank: int | None = None
    """The rank that wrote the line (rank 0)."""
    global_steps: int | None = None
    skipped_steps: int | None = None
    """Steps skipped so far."""
    peak_rss_bytes: Bytes | None = None
    """This process's peak resident memory (VmHWM) so far."""
    max_memory_allocated_bytes: Bytes | None = None
    """torch.cuda.max_memory_allocated on GPU; None on CPU."""
    max_memory_reserved_bytes: Bytes | None = None
    """torch.cuda.max_memory_reserved on GPU; None on CPU."""
    comms: dict[str, CommCount] | None = None
    """This step's collectives by torch.distributed name."""
    loss_scale: float | None = None
    """fp16's dynamic loss scale after the step; None when the plan has no loss scaling."""
    grad_norm: float | None = None

    @property
    def peak_memory_bytes(self) -> Bytes | None:
        """The peak the tuner ranks by: the accelerator's reserved bytes when reported, else peak RSS."""
        return self.max_memory_reserved_bytes or self.peak_rss_bytes


class SummaryRecord(_Record):
    """The last line of a run that finished: the steady-state figures and every rank's peak."""

    summary: Literal[True] = True
    steps: int | None = None
    """Optimizer steps run."""
    mean_step_time_s: Seconds | None = None
    """Mean over the steps after the first (which includes warm-up)."""
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_rss_bytes_per_rank: list[Bytes] | None = None
    """Each rank's peak resident memory, in rank order (every pipeline stage included)."""
    skipped_steps: int | None = None
    loss_start: float | None = None
    """First and last loss of the steps taken (the built-in loop)."""
    loss_end: float | None = None
    wall_s: Seconds | None = None
    comms_per_step: dict[str, CommCount] | None = None
    """The last step's collectives."""
    model: str | None = None
    """What the built-in loop trained: a preset's name, a spec file or module:function."""
    stage: int | None = None
    """The plan's ZeRO stage."""
    world_size: int | None = None
    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    pipeline_schedule: str | None = None
    dtype: str | None = None
    """The plan's parameter dtype."""

    @property
    def peak_memory_bytes(self) -> Bytes | None:
        """The largest peak over all ranks, when reported."""
        return max(self.peak_rss_bytes_per_rank) if self.peak_rss_bytes_per_rank else None


class FailureRecord(_Record):
    """Why a run failed, as the failing rank told it (runtime/diagnose.py's RunFailure)."""

    failure: Literal[True] = True
    rank: int | None = None
    """The rank the failure started on; None when no rank said (the launcher's own status)."""
    kind: str
    """"crash", "oom", "timeout", "config", ... (runtime/failure.py lists them)."""
    cause: str
    """One line naming the rank, what happened and where."""
    detail: str = ""
    """The failing rank's traceback or fault dump (its end)."""


MetricsRecord = Union[StepRecord, SummaryRecord, FailureRecord]


def parse_record(text: str, *, path: str | Path, line: int) -> MetricsRecord:
    """One line of the metrics file at `path` (`line` counted from 1), or ConfigError naming both."""
    source = f"{path}, line {line}"
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(Problem("", f"not a JSON object: {e}", given=text.strip()), source=source) from e
    if not isinstance(data, dict):
        raise ConfigError(Problem("", "expected a JSON object (a step, summary or failure record)",
                                  given=data), source=source)
    kind = FailureRecord if "failure" in data else SummaryRecord if "summary" in data else StepRecord
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        problems = [Problem(".".join(str(p) for p in err["loc"]), f"{err['msg']} (in a {kind.__name__})",
                            given=NOT_GIVEN if err["type"] == "missing" else err["input"])
                    for err in e.errors()]
        raise ConfigError(problems, source=source) from e


class MetricsTail:
    """Reads a metrics file as it grows: each call returns the records completed since the last.

    A line being written (no newline yet) is left for the next call; a file not yet created
    reads as empty."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.lines = 0

    def read_new(self) -> list[MetricsRecord]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        records = []
        for raw in chunk[:end].split(b"\n")[:-1]:
            self.lines += 1
            if raw.strip():
                records.append(parse_record(raw.decode("utf-8", errors="replace"), path=self.path, line=self.lines))
        return records


def read_records(path: str | Path) -> list[MetricsRecord]:
    """Every complete record of the metrics file at `path`."""
    return MetricsTail(path).read_new()


def read_summary(path: str | Path) -> SummaryRecord:
    """The SummaryRecord of the finished run whose metrics file is at `path`."""
    records = read_records(path)
    summaries = [r for r in records if isinstance(r, SummaryRecord)]
    if not summaries:
        last = type(records[-1]).__name__ if records else "nothing"
        raise ConfigError(Problem("summary", f"no summary record: the run did not finish (the last line is {last})"),
                          source=str(path))
    return summaries[-1]
