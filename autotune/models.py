"""What the trials train, and the model shape the compiler ranks and prunes them with.

Three kinds of workload, one per `zeroplan autotune` form:
- `--model PRESET` (or a ModelSpec JSON): the built-in GPT; the spec is the preset;
- `--model module:function`: your model and batch function (runtime/user_model.py has the
  contract); its spec is measured from the nn.Module in a subprocess
  (`python -m zeroplan.runtime.user_model`), so the tuner itself never imports torch;
- `--script train.py [-- ARGS]`: your training script, which calls `zeroplan.initialize`;
  its spec comes from one "model info" run of the script (`python -m zeroplan.runtime.rank
  --model-info FILE train.py ARGS`, runtime/model_info.py: the first forward measures the
  model, writes the spec and ends the run), as DeepSpeed's autotuner starts with a model-info
  experiment. The script runs as a trial's rank runs it.
Either measurement is a child of the tuner like a trial (child.py): it ends with the tuner,
kill -9 included.
`--model-spec PRESET|FILE` skips the measurement. The measured spec is kept in
`<out>/model_spec.json` (read it to see what the estimates assume).

Trials run `zeroplan train PLAN --model M --steps N --metrics FILE` (the first two kinds) or
`zeroplan train PLAN --steps N --metrics FILE -- train.py ARGS` (a script: the engine writes
the metrics and ends the run after N steps). The directory autotune was started from is put
on PYTHONPATH, and a script runs there, so relative imports and paths work as they do by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from zeroplan.schemas import ConfigError, ModelSpec, Problem
from zeroplan.schemas.model import is_model_function

from . import child

SPEC_FILE = "model_spec.json"
TIMING_FILE = "model_timing.json"
"""One forward + backward of a `--model module:function` at micro-batch 1, timed by the
measurement run (`micro_step_s`): the learned cost model's overhead prior (learned_cost.py)."""
MEASURE_TIMEOUT_S = 600


@dataclass(frozen=True)
class TrialWorkload:
    """What every trial of `zeroplan autotune` runs: the built-in GPT, a model function or a
    script (bench/workload.py's Workload is a benchmark's, unrelated)."""

    model: str = "tiny"
    """`zeroplan train --model`: a preset, a ModelSpec JSON, or module:function."""
    script: tuple[str, ...] = ()
    """A training script and its arguments; when given, trials run it instead of `--model`."""
    cwd: Path = Path(".")
    """Where autotune was started: on the trials' PYTHONPATH, and a script's working directory."""

    def command(self, plan_path: Path, steps: int, metrics: Path) -> list[str]:
        base = [sys.executable, "-m", "zeroplan", "train", str(plan_path), "--steps", str(steps),
                "--metrics", str(metrics)]
        return [*base, "--", *self.script] if self.script else [*base, "--model", self.model_ref()]

    def model_ref(self) -> str:
        """`--model` for a trial, which runs in its own directory: a file path made absolute."""
        module, sep, fn = self.model.rpartition(":")
        if sep and is_model_function(self.model) and (module.endswith(".py") or "/" in module):
            return f"{(self.cwd / module).resolve()}:{fn}"
        return self.model

    def env(self) -> dict[str, str]:
        path = [str(self.cwd.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {"PYTHONPATH": os.pathsep.join(path)}

    def run_dir(self, trial_dir: Path) -> Path:
        """A script runs where autotune was started; the built-in loop in its trial directory."""
        return self.cwd.resolve() if self.script else trial_dir


def resolve_model(workload: TrialWorkload, *, model_spec: str | None, out_dir: Path,
                  threads: int = 1) -> ModelSpec:
    """The ModelSpec the compiler uses for this workload (see the module docstring). Measuring
    a model function also times one micro-step of it on `threads` threads (a rank's share of
    the cores) into `<out>/model_timing.json` (`micro_step_seconds`), unless an earlier run of
    this study did: a resumed study ranks with the same figures, as with cluster.json."""
    if model_spec is not None:
        return ModelSpec.load(model_spec)
    if not workload.script and not is_model_function(workload.model):
        return ModelSpec.load(workload.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = (out_dir / SPEC_FILE).resolve()
    output.unlink(missing_ok=True)
    env = workload.env()
    if workload.script:  # run as a trial runs it (a rank's entry point binds it to the tuner)
        command = [sys.executable, "-m", "zeroplan.runtime.rank", "--model-info", str(output), *workload.script]
        what = f"script {workload.script[0]}"
    else:
        command = [sys.executable, "-m", "zeroplan.runtime.user_model", workload.model, "-o", str(output)]
        if micro_step_seconds(out_dir, model=workload.model) is None:
            command += ["--timing", str((out_dir / TIMING_FILE).resolve()), "--threads", str(threads)]
        what = workload.model
    _run_measurement(command, env=env, cwd=workload.cwd, what=what, output=output)
    return ModelSpec.load(output)


def micro_step_seconds(out_dir: Path, *, model: str) -> float | None:
    """The model-info run's timing of one micro-step of the model function `model`
    (`resolve_model`), or None when it was not timed (a preset, --model-spec, a script)."""
    path = out_dir / TIMING_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return float(record["micro_step_s"]) if record.get("model") == model else None


def _run_measurement(command: Sequence[str], *, env: dict, cwd: Path, what: str, output: Path) -> None:
    """Run the measurement as the tuner runs every child (child.py): it ends with the tuner."""
    try:
        done = child.run(command, env=env, cwd=cwd, timeout_s=MEASURE_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ConfigError(Problem("--model", f"measuring {what} timed out after {MEASURE_TIMEOUT_S} s",
                                  suggestion="pass --model-spec PRESET|FILE")) from e
    if done.returncode == 0 and output.is_file():
        return
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
    why = (f"exited {done.returncode}" if done.returncode else
           "ended without calling zeroplan.initialize(model) and a forward")
    raise ConfigError(Problem("--script" if "script" in what else "--model", f"measuring {what} failed: {why}"
                              + (f": {tail}" if tail else ""),
                              suggestion="fix the error above, or pass --model-spec PRESET|FILE"))
