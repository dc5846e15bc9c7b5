"""A throw-away Slurm cluster of two nodes on this machine, for checking emitted job scripts with
Slurm's own parser and scheduler (`sbatch --test-only`: the job is parsed, validated against the
partition and given a start estimate, and never runs).

The daemons are Debian's `slurm-wlm` package (`make slurm` installs it): one slurmctld and two
slurmd (`-N zp1`, `-N zp2`, each on its own port), every file in a temporary folder, ports picked
free on 127.0.0.1, `auth/none` (no munge key to create) and `config_overrides` (each node claims
8 CPUs and 8 GPUs whatever this machine has; gres.conf gives the GPUs empty files for devices,
and `CountOnly` keeps Slurm from probing them). slurmd
runs as root (it would start jobs as their users), so the cluster is only made as root.
Every wait is bounded (START_TIMEOUT_S, COMMAND_TIMEOUT_S); the daemons are stopped, and killed
if they linger, when the context ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from zeroplan.runtime.procs import free_port

START_TIMEOUT_S = 60
START_ATTEMPTS = 3
COMMAND_TIMEOUT_S = 30
NODES = ("zp1", "zp2")
CPUS, GPUS = 8, 8


def missing_reason() -> str | None:
    """Why no cluster can be made here, or None."""
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "sinfo")):
        return "Slurm is not installed (Debian's `slurm-wlm` package; `make slurm` installs it)"
    if os.geteuid() != 0:
        return "slurmd runs as root only (it starts jobs as their users); run the test as root"
    return None


def _config(root: Path, host: str) -> str:
    ctld, *ports = (free_port() for _ in range(1 + len(NODES)))
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS} "
                      f"Gres=gpu:{GPUS} State=UNKNOWN" for name, port in zip(NODES, ports))
    return f"""ClusterName=zeroplan
SlurmctldHost={host}
SlurmctldPort={ctld}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
GresTypes=gpu
{nodes}
PartitionName=main Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(root.glob("*.log")))


class DaemonEnded(RuntimeError):
    """A daemon exited while the cluster started (e.g. a port taken since it was picked)."""


def _wait_idle(env: dict, root: Path, daemons: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    states = ""
    while time.monotonic() < deadline:
        ended = [" ".join(d.args[:4]) for d in daemons if d.poll() is not None]
        if ended:
            raise DaemonEnded(f"{ended} ended before the nodes were idle\n{_logs(root)}")
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        states = done.stdout.strip()
        if done.returncode == 0 and all(f"{n} idle" in states for n in NODES):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Slurm nodes were not idle within {START_TIMEOUT_S} s (sinfo: {states!r})\n{_logs(root)}")


def _write_files(root: Path) -> dict:
    """slurm.conf, gres.conf and the folders under `root`; the environment naming slurm.conf."""
    for folder in ("state", "spool", "dev"):
        (root / folder).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(_config(root, socket.gethostname()))
    for gpu in range(GPUS):  # slurmd keeps only GPUs with a device file; it never opens them here
        (root / "dev" / f"gpu{gpu}").touch()
    (root / "gres.conf").write_text(f"NodeName=zp[1-{len(NODES)}] Name=gpu File={root}/dev/gpu[0-{GPUS - 1}] "
                                    "Flags=CountOnly\n")
    return {**os.environ, "SLURM_CONF": str(conf)}


def _start(env: dict, daemons: list[subprocess.Popen]) -> None:
    """Start slurmctld and the slurmds, appending each to `daemons` as it starts."""
    conf = env["SLURM_CONF"]
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], **quiet))
    for name in NODES:
        daemons.append(subprocess.Popen(["slurmd", "-D", "-N", name, "-f", conf], **quiet))


def _stop(daemons: list[subprocess.Popen], root: Path) -> None:
    for daemon in daemons:
        daemon.terminate()
    for daemon in daemons:
        try:
            daemon.wait(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=COMMAND_TIMEOUT_S)
    shutil.rmtree(root, ignore_errors=True)


@contextmanager
def cluster() -> Iterator[dict]:
    """Start the cluster; yield the environment (SLURM_CONF) that points Slurm's commands at it.
    A start whose daemon exits (its port taken meanwhile) is tried again on fresh ports, up to
    START_ATTEMPTS times."""
    assert missing_reason() is None, missing_reason()
    for attempt in range(1, START_ATTEMPTS + 1):
        root, daemons = Path(tempfile.mkdtemp(prefix="zeroplan-slurm-")), []
        try:
            env = _write_files(root)
            _start(env, daemons)
            _wait_idle(env, root, daemons)
            break
        except DaemonEnded:
            _stop(daemons, root)
            if attempt == START_ATTEMPTS:
                raise
        except BaseException:
            _stop(daemons, root)
            raise
    try:
        yield env
    finally:
        _stop(daemons, root)


def test_only(script: Path, *, env: dict) -> subprocess.CompletedProcess:
    """`sbatch --test-only script` on the cluster: exit 0 and a start estimate when Slurm accepts it."""
    return subprocess.run(["sbatch", "--test-only", str(script)], env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, cwd=script.parent)
