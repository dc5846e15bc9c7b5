"""A rank's entry point under `zeroplan train`.

    python -m zeroplan.runtime.rank script.py ARGS     # a training script as one rank
    python -m zeroplan.runtime.rank --model-info FILE script.py ARGS

(the built-in loop, runtime/train.py, calls `run_rank` itself). The second form is the
model-info run of `zeroplan autotune --script`, bound to the tuner: the script's
`zeroplan.initialize(model)` measures the model into FILE at its first forward and ends the
run (model_info.py). `run_rank(body)`:
1. binds the rank to the process that started it (lifeline.py): it ends when the torchrun
   agent or `zeroplan train` ends, within lifeline.GRACE_S even when stuck in a collective,
   and SIGTERM becomes an exception, so swap directories are removed on the way out;
2. reports how it ended into the run's report directory (failure.py), fatal signals included;
3. runs `body`. A ConfigError is the user's to fix: status 2, its problems printed once (by
   the launcher, when there is one); any other exception prints its traceback, status 1.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Callable

from zeroplan.schemas import ConfigError

from . import lifeline, model_info
from .failure import RankReport
from .precision import NonFiniteError


def run_rank(body: Callable[[], object]) -> int:
    """Run `body` as one rank of a job; the process's exit status."""
    report = RankReport.from_env()
    if lifeline.bind_to_parent():
        lifeline.end_on_sigterm()
    if report is not None:
        report.start()
        lifeline.at_emergency_exit(report.stuck)
    try:
        body()
    except BaseException as e:  # noqa: BLE001 - every way a rank ends is reported
        lifeline.exiting()
        return _ended(e, report)
    lifeline.exiting()
    if report is not None:
        report.finished()
    return 0


def _ended(exc: BaseException, report: RankReport | None) -> int:
    """Report how the rank ended; its exit status. Under a launcher (a report directory) the
    launcher prints a ConfigError or a non-finite step once; tracebacks are always printed."""
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        text, loud = str(exc.code), not isinstance(exc.code, int) and exc.code is not None
    elif isinstance(exc, ConfigError):
        code, text, loud = 2, f"error: {exc}", report is None
    elif isinstance(exc, NonFiniteError):
        code, text, loud = 1, f"error: rank {os.environ.get('RANK', '0')}: {exc}", report is None
    else:
        code, text, loud = 1, "".join(traceback.format_exception(exc)).rstrip(), True
    if code and report is not None:
        report.failed(exc)
    if loud:
        print(text, file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--model-info"] and len(argv) > 2:
        model_info.request(Path(argv[1]))
        argv = argv[2:]
    if not argv or argv[0].startswith("--"):
        print("usage: python -m zeroplan.runtime.rank [--model-info FILE] SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    script = argv[0]
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    return run_rank(lambda: runpy.run_path(script, run_name="__main__"))


if __name__ == "__main__":
    sys.exit(main())
