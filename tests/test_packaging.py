"""The install maps top-level folders into one `zeroplan` namespace; keep the list honest."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = config["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"unlisted: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_config_layer_imports_without_torch():
    code = "import sys, zeroplan, zeroplan.schemas, zeroplan.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_facade_exports_the_entry_points_lazily():
    code = ("import sys, zeroplan; assert 'torch' not in sys.modules; "
            "assert callable(zeroplan.compile) and callable(zeroplan.tune); "
            "assert 'torch' not in sys.modules; assert callable(zeroplan.initialize)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
