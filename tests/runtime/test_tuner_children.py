"""The tuner's children other than its trials end with it too (autotune/child.py): the model
measurement (of a `--script`, or of a `--model module:function`) and `zeroplan probe --quick`
with its workers.

Each test runs the real tuner until that child is running, then stops the tuner with a signal
(SIGTERM or Ctrl-C's SIGINT: it stops the child and exits 128 + the signal) and, in a second
run, kills it (kill -9: the child ends by its lifeline). Either way no process of the run is
left within a bound, no temporary or run directory, and the child did not finish its work
(an orphan would have: the probe writes its cluster.json, the measurement its spec).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rt_processes import MARK, kill_survivors, processes_with, wait_until

CONFIG = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
MEASURED = {  # what the tuner measures the model of: a slow start (a data load, a download) in each
    "train.py": '''\
import os, sys, time
from pathlib import Path
assert "--model-info" in sys.orig_argv  # the tuner's model-info run, not a trial
Path(os.environ["ZP_STARTED"]).write_text(str(os.getpid()))
time.sleep(3600)  # before zeroplan.initialize(model)
''',
    "slow_model.py": '''\
import os, time
from pathlib import Path
def build():
    Path(os.environ["ZP_STARTED"]).write_text(str(os.getpid()))
    time.sleep(3600)  # before returning (model, get_batch)
'''}
STARTED_S = 240
"""Bound on the tuner's start-up until its child runs (imports on a loaded 2-core machine)."""
GONE_S = 30
"""Bound on the time from the tuner's end to its last child's (a few lifeline.GRACE_S)."""


def _tuner(tmp_path: Path, mark: str, *args: str) -> subprocess.Popen:
    """`zeroplan autotune` started in `tmp_path` (no cluster.json there), its temporary files
    in `tmp_path/tmp`; every process of it carries $ZP_TEST_RUN = `mark`; a model measured
    says it started in `tmp_path/started`."""
    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "zeroplan", "autotune", "c.json", "--nproc-per-node", "2", "--out", "out", *args]
    env = {**os.environ, MARK: mark, "TMPDIR": str(tmp_path / "tmp"), "ZP_STARTED": str(tmp_path / "started")}
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """As at a terminal: SIGINT raises KeyboardInterrupt in the tuner even when this test runs
    where SIGINT is ignored (a background job), which Python would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _end(tuner: subprocess.Popen, sig: int, mark: str) -> float:
    """Send `sig` to the tuner; seconds until its last process is gone (asserted under GONE_S)."""
    tuner.send_signal(sig)
    _, err = tuner.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert tuner.returncode == 128 + sig and "run the same command to resume" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    start = time.monotonic()
    assert wait_until(lambda: not processes_with(mark), GONE_S), f"survivors: {processes_with(mark)}"
    return time.monotonic() - start


def _running(tuner: subprocess.Popen, condition) -> None:
    assert wait_until(lambda: tuner.poll() is not None or condition(), STARTED_S), "the child never ran"
    assert tuner.poll() is None, tuner.communicate()[1][-3000:]


def _left_behind(tmp_path: Path) -> list[str]:
    out = tmp_path / "out"
    return sorted([p.name for p in (tmp_path / "tmp").iterdir()]
                  + [f"out/{p.name}" for p in out.iterdir() if p.name.startswith((".", "zeroplan-"))])


@pytest.mark.parametrize("workload", [("--script", "train.py"), ("--model", "slow_model.py:build")],
                         ids=["script", "model-function"])
def test_sigterm_and_kill_9_of_the_tuner_end_its_model_measurement(tmp_path, workload):
    for name, source in MEASURED.items():
        (tmp_path / name).write_text(source)
    started = tmp_path / "started"
    mark = uuid.uuid4().hex
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            started.unlink(missing_ok=True)
            tuner = _tuner(tmp_path, mark, "--cluster", "cpu", *workload)
            _running(tuner, started.exists)
            seconds = _end(tuner, sig, mark)
            print(f"{workload}, {signal.Signals(sig).name}: the measurement's last process gone {seconds:.1f} s "
                  "after the tuner")
            assert not (tmp_path / "out" / "model_spec.json").exists()
            assert _left_behind(tmp_path) == []
    finally:
        kill_survivors(mark)


def test_ctrl_c_and_kill_9_of_the_tuner_end_its_probe_and_the_probes_workers(tmp_path):
    mark = uuid.uuid4().hex
    try:
        for sig in (signal.SIGINT, signal.SIGKILL):
            tuner = _tuner(tmp_path, mark, "--cluster", "auto", "--model", "tiny")
            _running(tuner, lambda: len(processes_with(mark, argv_has="spawn_main")) == 2)  # the collectives
            seconds = _end(tuner, sig, mark)
            print(f"{signal.Signals(sig).name}: the probe's last process gone {seconds:.1f} s after the tuner")
            assert not (tmp_path / "out" / "cluster.json").exists()  # stopped, not finished
            assert _left_behind(tmp_path) == []
    finally:
        kill_survivors(mark)
