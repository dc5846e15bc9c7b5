"""torchrun for `zeroplan train`: torch's own agent (`torch.distributed.run.main`, the same
arguments), run inside a process that also
- ends with `zeroplan train` (lifeline.py), and names itself as its ranks' parent, so each rank
  ends with it: torchrun starts every rank in a session of its own, where no signal sent to
  the launcher's process group reaches it;
- writes each failed rank's exit status, signal included, to the run's report directory
  (`exits.json`, from torch's ChildFailedError), where the launcher reads them beside the
  ranks' own reports (diagnose.py); torchrun's failure banner is not printed, the launcher
  prints the cause once.

    python -m zeroplan.runtime.agent --nnodes 1 --nproc-per-node 2 ... -m zeroplan.runtime.train ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from zeroplan.schemas.atomic import atomic_write_text

from . import lifeline
from .run_env import REPORT_DIR_ENV

EXITS_FILE = "exits.json"
"""{rank: {"exitcode", "pid", "time"}} of the ranks whose failure ended the run."""


def main(argv: list[str] | None = None) -> int:
    lifeline.bind_to_parent(grace_s=lifeline.AGENT_SHUTDOWN_S + 1)
    os.environ.update(lifeline.child_env({}))  # torchrun's ranks inherit this environment
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(argv)
    except ChildFailedError as e:
        _write_exits({rank: {"exitcode": f.exitcode, "pid": f.pid, "time": f.timestamp}
                      for rank, f in e.failures.items()})
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def _write_exits(exits: dict[int, dict]) -> None:
    directory = os.environ.get(REPORT_DIR_ENV)
    if directory and Path(directory).is_dir():
        atomic_write_text(Path(directory) / EXITS_FILE, json.dumps({str(k): v for k, v in exits.items()}))


if __name__ == "__main__":
    sys.exit(main())
