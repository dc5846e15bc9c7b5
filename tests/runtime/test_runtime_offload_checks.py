"""NVMe swap paths are checked before training starts, swap files go away however the run
ends, and swap files store exactly what was written (one process each, no spawn)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import zeroplan
from rt_plans import make_plan
from zeroplan.runtime.offload.swap import SwapDir, SwapFile
from zeroplan.schemas import ConfigError
from zeroplan.schemas.plan import OffloadPlan, OffloadTarget

OPT_KEY = "zero_optimization.offload_optimizer.nvme_path"
PARAM_KEY = "zero_optimization.offload_param.nvme_path"
HERE = Path(__file__).parent


def _plan(path, *, stage: int = 2, param: str | None = None):
    offload = OffloadPlan(optimizer=OffloadTarget(device="nvme", nvme_path=str(path)),
                          param=OffloadTarget(device="nvme", nvme_path=str(param)) if param else OffloadTarget())
    return make_plan(stage=stage, world=1, offload=offload)


def _problems(model: nn.Module, plan) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        zeroplan.initialize(model, plan=plan)
    return {p.path: p.render() for p in info.value.problems}


def test_missing_path_and_file_instead_of_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    got = _problems(nn.Linear(4, 4), _plan(tmp_path / "nope", stage=3, param=tmp_path / "file"))
    assert "does not exist" in got[OPT_KEY] and "mkdir" in got[OPT_KEY]
    assert "is not a directory" in got[PARAM_KEY]


def test_unwritable_path(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits; the immutable flag stops it
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode:
            pytest.skip("running as root where the immutable flag cannot be set")
        undo = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o500)
        undo = ["chmod", "700", str(locked)]
    try:
        got = _problems(nn.Linear(4, 4), _plan(locked))
    finally:
        subprocess.run(undo, check=True)
    assert "is not writable by this process" in got[OPT_KEY] and str(locked) in got[OPT_KEY]


def test_too_little_free_space_names_the_bytes(tmp_path):
    """A model whose shard needs more swap bytes than the disk has free: a parameter that claims
    10^12 elements (an expanded view; the check runs before any parameter is touched)."""
    huge = nn.Module()
    huge.w = nn.Parameter(torch.zeros(1).expand(10**12))
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert 12 * 10**12 > free, "the disk is larger than the test assumes"
    got = _problems(huge, _plan(tmp_path))[OPT_KEY]
    assert "swap files need" in got and "bytes) free" in got and str(tmp_path) in got
    assert "(12000000000000 bytes:" in got, got


def test_file_size_limit_is_reported_not_hit(tmp_path):
    """A process may not write files past RLIMIT_FSIZE (SIGXFSZ would kill the rank mid-step)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        got = _problems(nn.Linear(1024, 1024), _plan(tmp_path))[OPT_KEY]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "RLIMIT_FSIZE" in got and "1048576 bytes" in got


def test_training_reports_a_missing_path_without_traceback(tmp_path):
    _plan(tmp_path / "missing").save(tmp_path / "plan.json")
    run = subprocess.run([sys.executable, "-m", "zeroplan.runtime.train", "--plan", str(tmp_path / "plan.json"),
                          "--model", "tiny", "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert OPT_KEY in run.stderr and "does not exist" in run.stderr and "Traceback" not in run.stderr


_ENDINGS = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {here!r})
    import zeroplan
    from test_runtime_offload_checks import _plan
    engine = zeroplan.initialize(torch.nn.Linear(64, 64), plan=_plan({root!r}))
    print(engine.optimizer.state.folder.path, flush=True)
    sys.stdin.readline()
    if sys.argv[1] == "raise":
        raise RuntimeError("training failed")
    time.sleep(60)
""")


@pytest.mark.parametrize("ending", ["raise", "sigterm"])
def test_swap_directory_is_removed_when_the_run_dies(tmp_path, ending):
    script = _ENDINGS.format(here=str(HERE), root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script, ending], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    folder = Path(proc.stdout.readline().strip())
    assert folder.parent == tmp_path and folder.is_dir(), proc.stderr.read() if proc.poll() is not None else folder
    proc.stdin.write("go\n")
    proc.stdin.flush()
    if ending == "sigterm":
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == (1 if ending == "raise" else 128 + signal.SIGTERM)
    assert not folder.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_file_ranges_round_trip(tmp_path, dtype):
    """Unaligned writes read-modify-write their edge blocks: neighbours keep their values."""
    folder = SwapDir(root=tmp_path, label="t")
    numel = 10_000 + 3
    f = SwapFile(folder.path / "x.swp", numel=numel, dtype=dtype)
    want = torch.zeros(numel, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        lo = int(torch.randint(0, numel, (1,), generator=g))
        hi = int(torch.randint(lo + 1, numel + 1, (1,), generator=g))
        values = torch.randn(hi - lo, generator=g)
        f.write(lo, values)
        want[lo:hi] = values.to(dtype)
        a, b = sorted(int(x) for x in torch.randint(0, numel, (2,), generator=g))
        assert torch.equal(f.read(a, b - a + 1) if b < numel else f.read(a, numel - a), want[a:b + 1][:numel - a])
    assert torch.equal(f.read(0, numel), want)
    f.close()
    folder.close()
    assert not folder.path.exists()
