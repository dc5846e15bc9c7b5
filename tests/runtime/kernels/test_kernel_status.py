"""`zeroplan env` on a machine where cpu_adam is built: it loads, with the SIMD paths it runs."""

from __future__ import annotations

from typer.testing import CliRunner

from zeroplan.cli import app
from zeroplan.runtime.kernels import cpu_simd_paths
from zeroplan.runtime.kernels.loader import CPU_ADAM


def test_env_reports_the_built_cpu_adam_and_its_simd_paths(cpu_adam_ext):
    assert CPU_ADAM.built() is not None
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("cpu_adam "))
    assert row.split(None, 1)[1] == (f"loads (build {CPU_ADAM.build_dir().name}); "
                                     f"SIMD paths: {', '.join(cpu_simd_paths())}")
    assert cpu_simd_paths()[-1] == "scalar"
