"""`zeroplan --version` and `zeroplan env` (the machine as zeroplan sees it), quick: nothing is built."""

from __future__ import annotations

import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from typer.testing import CliRunner

from zeroplan.cli import app
from zeroplan.runtime.environment import VECTOR_FLAGS, cpu_flags

ROOT = Path(__file__).parents[2]


def test_version_is_the_package_version_and_needs_no_torch():
    code = ("import sys; from zeroplan.cli import main; sys.argv = ['zeroplan', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert run.stdout == f"zeroplan {version}\n"


def _env(monkeypatch, tmp_path, *args: str, **environ: str) -> str:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: nothing is built yet
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["env", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _row(output: str, name: str) -> str:
    return next(line.split(None, len(name.split()))[-1] for line in output.splitlines()
                if line.strip().startswith(name + " "))


def test_env_reports_versions_build_cpu_and_extras(monkeypatch, tmp_path):
    out = _env(monkeypatch, tmp_path)
    assert _row(out, "python").startswith(platform.python_version())
    assert _row(out, "torch").startswith(torch.__version__)
    assert _row(out, "build") == (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")
    assert "gloo yes" in _row(out, "collectives")
    units = _row(out, "vector units").split()
    assert [f for f in VECTOR_FLAGS if f in cpu_flags()] == [u for u in units if u in VECTOR_FLAGS]
    for extra in ("transformers", "tensorboard", "wandb", "plotly", "psycopg"):
        assert f"\n  {extra} " in out
    import plotly  # the dev extra has it

    assert _row(out, "plotly") == plotly.__version__


def test_env_reports_an_unbuilt_kernel_without_building_it(monkeypatch, tmp_path):
    out = _env(monkeypatch, tmp_path)
    assert _row(out, "cpu_adam").startswith("not built yet") and "zeroplan env --build" in out
    assert not any(tmp_path.iterdir())  # no build was started
    missing = _env(monkeypatch, tmp_path, CXX="no-such-compiler")
    assert _row(missing, "cpu_adam") == "cannot be built here: no C++ compiler: CXX='no-such-compiler' is not on PATH"
