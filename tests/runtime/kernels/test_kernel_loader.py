"""The JIT loader: where it caches, that the sources ship, and the fallback when no build is
possible (a missing compiler, a failing one), checked in a fresh interpreter each time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from zeroplan.runtime.kernels.loader import CPU_ADAM, CSRC_DIR, CUDA_ADAM, extensions_root, machine_key

REPO = Path(__file__).resolve().parents[3]


def test_cache_root_respects_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    assert CPU_ADAM.build_dir().parent == tmp_path / machine_key()


def test_cache_root_defaults_under_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert extensions_root() == tmp_path / ".cache" / "zeroplan" / "torch_extensions"


def test_build_dir_changes_with_the_sources(monkeypatch, tmp_path):
    """An edited source never loads a stale binary: the folder name hashes sources and flags."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert CPU_ADAM.build_dir() == CPU_ADAM.build_dir()
    assert CPU_ADAM.build_dir() != CUDA_ADAM.build_dir()
    assert "torch" in machine_key() and os.uname().machine in machine_key()


def test_every_source_is_package_data():
    """The wheel carries what the loader compiles (pyproject's package-data globs)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["zeroplan.csrc"]
    shipped = {p for g in globs for p in CSRC_DIR.glob(g)}
    needed = set(CPU_ADAM.sources + CUDA_ADAM.sources + CPU_ADAM._headers() + CUDA_ADAM._headers())
    assert needed and needed <= shipped
    assert "zeroplan.csrc" in config["tool"]["setuptools"]["packages"]


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings, torch
    from zeroplan.runtime.kernels import KernelWarning, adam_step, resolve_optimizer_kernel
    n = 1001
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(n, generator=gen).requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    state = dict(param=ref.detach().clone(), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n))
    copy = torch.empty(n, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_optimizer_kernel("cpu_adam", device="cpu") == "torch_foreach"
        for step in range(1, 6):
            grad = torch.randn(n, generator=gen)
            ref.grad = grad.clone()
            opt.step()
            ran = adam_step(**state, grad=grad, step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.1, decoupled=True, bf16_out=copy)
            assert ran == "torch_foreach", ran
    assert torch.equal(state["param"], ref.detach())
    assert torch.equal(copy, state["param"].to(torch.bfloat16))
    for w in caught:
        print(f"WARNING {w.category.__name__}: {w.message}")
    """
)


@pytest.mark.parametrize(
    ("cxx", "reason"),
    [("/nonexistent/c++", "no C++ compiler: CXX='/nonexistent/c++' is not on PATH"), ("false", "building it failed: CalledProcessError")],
    ids=["no_compiler", "failing_compiler"],
)
def test_unbuildable_extension_falls_back_with_one_notice(tmp_path, cxx, reason):
    env = {**os.environ, "CXX": cxx, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1, warned
    assert warned[0].startswith("WARNING KernelWarning: optimizer kernel 'cpu_adam' cannot run on cpu")
    assert reason in warned[0] and "Using 'torch_foreach' instead" in warned[0]
