"""The process seam (runtime/procs.py): ports, process-group stops and log tails, as the
launchers (`zeroplan train`, the tuner, bench) rely on them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from zeroplan.runtime import procs


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_free_port_can_be_bound():
    port = procs.free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_stop_group_kills_a_leader_that_ignores_sigterm():
    proc = _start("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                  "time.sleep(60)")
    assert proc.stdout.readline() == "up\n"
    start = time.monotonic()
    assert procs.stop_group(proc, grace_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - start < 10


def test_stop_group_leaves_no_worker_behind_its_exited_leader():
    """The leader ends on SIGTERM; the worker it started (same group) ignores SIGTERM and would
    outlive it without the SIGKILL that follows the leader's exit."""
    worker = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    proc = _start("import subprocess, sys, time; "
                  f"w = subprocess.Popen([sys.executable, '-c', {worker!r}]); print(w.pid, flush=True); "
                  "time.sleep(60)")
    worker_pid = int(proc.stdout.readline())
    time.sleep(0.3)  # the worker has installed its handler
    assert procs.stop_group(proc, grace_s=5.0) == -signal.SIGTERM
    assert _wait_gone(worker_pid)


def test_stop_group_of_a_finished_child_returns_its_status():
    proc = _start("raise SystemExit(3)")
    proc.wait()
    assert procs.stop_group(proc, grace_s=1.0) == 3
    assert procs.signal_group(proc, signal.SIGTERM) is False


def test_tail_reads_the_last_lines_of_at_most_the_last_bytes(tmp_path):
    log = tmp_path / "rank0.log"
    assert procs.tail(log, lines=5) == ""
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(100)) + b"bad \xff byte\n")
    assert procs.tail(log, lines=3) == "line 98\nline 99\nbad \ufffd byte"
    log.write_bytes(b"x" * (2 * procs.TAIL_BYTES) + b"\nend")
    assert procs.tail(log, lines=5) == "x" * (procs.TAIL_BYTES - 4) + "\nend"


def test_the_seam_and_the_tuner_import_no_torch():
    code = ("import sys, zeroplan.runtime.procs, zeroplan.autotune.child, zeroplan.autotune.runner; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_the_package_still_exports_the_runtime_entry_points():
    """Lazily loaded, and `initialize` stays the function even once its submodule is imported."""
    code = ("import zeroplan.runtime.launch; from zeroplan.runtime import Engine, PLAN_ENV, initialize; "
            "import zeroplan; assert callable(initialize) and zeroplan.initialize is initialize; "
            "assert PLAN_ENV == 'ZEROPLAN_PLAN' and Engine.__name__ == 'Engine'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
