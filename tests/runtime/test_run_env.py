"""The ZEROPLAN_* environment contract: every variable the product uses is named once, in run_env.py."""

from __future__ import annotations

import re
from pathlib import Path

from zeroplan.runtime import run_env

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("schemas", "compiler", "autotune", "runtime", "zeroplan")


def _sources():
    for folder in PRODUCT:
        yield from (ROOT / folder).rglob("*.py")


def test_every_variable_mentioned_is_in_the_contract():
    mentioned = {m for path in _sources() for m in re.findall(r"ZEROPLAN_[A-Z_]+", path.read_text())}
    assert mentioned == set(run_env.ALL), "document a new variable in runtime/run_env.py, or drop a stale mention"


def test_each_name_is_spelled_out_only_in_run_env():
    literal = re.compile(r"[\"']ZEROPLAN_[A-Z_]+[\"']")
    spelled = sorted(str(p.relative_to(ROOT)) for p in _sources() if literal.search(p.read_text()))
    assert spelled == ["runtime/run_env.py"]


def test_the_docstring_table_has_a_row_per_variable():
    rows = [line for line in run_env.__doc__.splitlines() if line.startswith("| `ZEROPLAN_")]
    assert [re.match(r"\| `(\w+)`", r).group(1) for r in rows] == list(run_env.ALL)
