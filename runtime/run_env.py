"""The ZEROPLAN_* environment variables: the whole contract between a launcher and what it starts.

A training script is the user's program, run unchanged as every rank (`zeroplan train PLAN --
script.py ARGS`, and each trial of `zeroplan autotune --script`): its command line is its own,
so what zeroplan must tell the `zeroplan.initialize(model)` inside it travels in the
environment. Everything else is a command-line flag or a Plan field. These are all the
variables, each named here once and imported by its setter and its reader:

| variable              | set by                                       | read by                               | why |
|-----------------------|----------------------------------------------|---------------------------------------|-----|
| `ZEROPLAN_PLAN`       | `zeroplan train` (launch.py), every run       | `initialize()` without `plan=`        | a script finds the plan it is launched with |
| `ZEROPLAN_METRICS`    | `zeroplan train --metrics FILE -- script.py` | the Engine's StepReporter (metrics.py) | rank 0 of a script writes the metrics file (schemas/steps.py) |
| `ZEROPLAN_MAX_STEPS`  | `zeroplan train --steps N -- script.py`      | the Engine's StepReporter             | a script's run ends after N optimizer steps (TrialComplete) |
| `ZEROPLAN_REPORT_DIR` | `zeroplan train` (launch.py)                 | each rank (failure.py), the agent     | ranks report how they ended, for diagnose.py |
| `ZEROPLAN_PARENT_PID` | every launcher (`lifeline.child_env`)        | `lifeline.bind_to_parent` (popped)    | a child ends with the process that started it |

The built-in loop (runtime/train.py) has `--steps` and `--metrics` of its own and removes the
two metrics variables from its environment. The model-info run of `zeroplan autotune
--script` is not steered through the environment: it is its own entry point,
`python -m zeroplan.runtime.rank --model-info FILE script.py ARGS` (model_info.py), so no
process the script starts inherits it.

Torch-free: the tuner and the CLI import it.
"""

from __future__ import annotations

PLAN_ENV = "ZEROPLAN_PLAN"
"""Absolute path of the plan.json the run was launched with."""
METRICS_ENV = "ZEROPLAN_METRICS"
"""Path rank 0 appends one record per optimizer step to, and a summary at the last step."""
MAX_STEPS_ENV = "ZEROPLAN_MAX_STEPS"
"""Optimizer steps after which `engine.step()` ends the run (raises TrialComplete); >= 1."""
REPORT_DIR_ENV = "ZEROPLAN_REPORT_DIR"
"""The run's private directory the ranks report into (rundir.py makes it, diagnose.py reads it)."""
PARENT_ENV = "ZEROPLAN_PARENT_PID"
"""Pid of the process whose death must end this one."""

ALL = (PLAN_ENV, METRICS_ENV, MAX_STEPS_ENV, REPORT_DIR_ENV, PARENT_ENV)
"""Every ZEROPLAN_* variable zeroplan sets or reads."""
