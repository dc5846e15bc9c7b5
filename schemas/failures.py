"""`failures` block: zeroplan's bounds on a failing run.

DeepSpeed has no block for these: its collective timeout is an argument of
`deepspeed.init_distributed(timeout=...)` (torch's `init_process_group`, 30 minutes by
default), and an fp32/bf16 step with an inf/nan gradient is applied, so every later loss is
nan. Here a stuck rank ends the job within `collective_timeout_s`, and a non-finite step
stops the run naming it (or is skipped, as fp16's loss scaler skips).
"""

from .types import StrictModel, choice, real


class FailuresConfig(StrictModel):
    """How a run ends when a rank is stuck or a step goes non-finite (zeroplan's block)."""

    collective_timeout_s: real(ge=1) = 600.0
    """Seconds a collective waits for every rank before it raises on the ranks waiting in it;
    the job then ends naming the rank that did not come. At least 1. Starting the ranks
    (joining the world) is given at least 300 s whatever this says."""
    nonfinite: choice("stop", "skip") = "stop"
    """fp32/bf16: a step whose loss or gradient norm is inf or nan stops the run ("stop",
    `zeroplan train` exits 1 naming the step) or is skipped on every rank ("skip"). fp16
    steps are governed by the loss scaler."""
