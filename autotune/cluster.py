"""The machine figures the tuner ranks candidates with: measured ones whenever it can.

The warm start enqueues the cost model's best candidates first, so it is only as good as the
rates the model is given. Nominal rates rank this machine's plans no better than chance (the
`cpu` preset once predicted 8.4 s for a 2.5 s step, and nothing of the per-micro-step and
per-call costs that separate the candidates), so `--cluster auto`, the default, looks for a
measured cluster, in order:

1. `cluster.json` in the working directory (`zeroplan probe`'s output, `--cluster local`),
   when it was measured with the tune's ranks per node;
2. `<out>/cluster.json`, probed by an earlier run of this study (a resumed study ranks with
   the same figures);
3. otherwise `zeroplan probe --quick` runs in a subprocess (about 20 s on a small CPU box, a
   minute on a GPU node) and writes `<out>/cluster.json`. It is a child of the tuner like a
   trial (child.py), and its workers are bound to it (runtime/probe.py): all end with the
   tuner, kill -9 included.
A probe that fails falls back to the `cpu` preset with a notice saying why. Any other
`--cluster` value (a preset, `local`, a file) is used as given.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

from zeroplan.schemas import ClusterSpec, ConfigError, ConfigWarning
from zeroplan.schemas.cluster import LOCAL_CLUSTER_FILE

from . import child

AUTO = "auto"
PROBE_FILE = "cluster.json"
PROBE_TIMEOUT_S = 600


def probe_command(*, nproc: int, output: Path) -> list[str]:
    return [sys.executable, "-m", "zeroplan", "probe", "--quick", "--nproc", str(nproc), "-o", str(output),
            "--path", str(output.parent)]


def _measured(path: Path, *, nproc: int) -> ClusterSpec | None:
    if not path.is_file():
        return None
    spec = ClusterSpec.load(path)
    return spec if spec.rates_source == "measured" and spec.nproc_per_node == nproc else None


def resolve_cluster(name: str, *, out_dir: Path, nproc: int) -> tuple[ClusterSpec, str]:
    """(cluster, where its figures come from) for `--cluster NAME`; see the module docstring."""
    if name != AUTO:
        return ClusterSpec.load(name), name
    for path in (Path(LOCAL_CLUSTER_FILE), out_dir / PROBE_FILE):
        spec = _measured(path, nproc=nproc)
        if spec is not None:
            return spec, f"measured ({path})"
    output = out_dir / PROBE_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = child.run(probe_command(nproc=nproc, output=output), timeout_s=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        why = f"timed out after {PROBE_TIMEOUT_S} s"
    else:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1] if done.returncode else ""
    if not why:
        try:
            return ClusterSpec.load(output), f"measured now ({output}, zeroplan probe --quick)"
        except ConfigError as e:
            why = str(e)
    warnings.warn(ConfigWarning(f"--cluster auto: probing this machine failed ({why}); ranking candidates with "
                                "the nominal 'cpu' preset. Run `zeroplan probe` or pass --cluster."))
    return ClusterSpec.load("cpu"), "cpu (nominal; the probe failed)"
