"""What of a plan's pipeline this runtime runs, checked before any process or tensor exists.

Torch-free: `zeroplan train` asks before it launches, `initialize` before it builds, so a plan
this runtime cannot run is a user error (status 2, the key named), never a failure mid-run.
"""

from __future__ import annotations

from zeroplan.schemas import ConfigError, Plan, Problem


def check_pipeline(plan: Plan) -> None:
    """pp > 1 runs ZeRO stages 0-2, no sequence parallelism and the 1F1B or GPipe schedule (the
    compiler refuses the first two; a hand-made plan is refused here). The interleaved schedule is
    compiled and estimated (compiler/cost.py) but has no executor here yet."""
    p = plan.parallel
    if p.pp > 1 and plan.zero.stage == 3:
        raise ConfigError(Problem("zero.stage", f"ZeRO stage 3 with pp({p.pp}) > 1 is not supported: "
                                  "stage 3 gathers parameters per module while pipeline stages own disjoint modules",
                                  suggestion="compile the plan with zero_optimization.stage 0, 1 or 2, or parallel.pp 1"))
    if p.pp > 1 and p.tp > 1 and p.sequence_parallel:
        raise ConfigError(Problem("parallel.sequence_parallel", f"sequence parallelism with pp({p.pp}) > 1 "
                                  "is not supported: pipeline stages exchange whole-sequence activations", given=True,
                                  suggestion="compile the plan with parallel.sequence_parallel false, or parallel.pp 1"))
    if p.pipeline_schedule == "interleaved":
        raise ConfigError(Problem("parallel.pipeline_schedule", f"the interleaved schedule (virtual_stages "
                                  f"{p.pipeline_virtual_stages}) is planned and estimated but this runtime does not "
                                  "run it", given="interleaved",
                                  suggestion="compile the plan with parallel.pipeline.schedule '1f1b' (or 'gpipe') "
                                  "and no virtual_stages"))
