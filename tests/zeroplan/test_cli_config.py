"""`zeroplan validate` and `zeroplan schema` as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"


def zeroplan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroplan", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_validate_prints_the_resolved_config_and_exits_0():
    run = zeroplan("validate", str(EXAMPLES / "hf_zero2.json"))
    assert run.returncode == 0, run.stderr
    resolved = json.loads(run.stdout)
    assert resolved["zero_optimization"]["stage"] == 2
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert resolved["train_batch_size"] == "auto"


def test_validate_with_world_size_reports_degrees_and_derived_batch(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_batch_size: 32\ntrain_micro_batch_size_per_gpu: 4\n")
    run = zeroplan("validate", str(cfg), "--world-size", "4")
    assert run.returncode == 0, run.stderr
    resolved = json.loads(run.stdout)["_resolved"]
    assert (resolved["dp"], resolved["tp"], resolved["pp"]) == (4, 1, 1)
    assert resolved["batch"]["gradient_accumulation_steps"] == 2
    assert resolved["batch"]["derived"] == ["gradient_accumulation_steps"]


def test_validate_lists_every_problem_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"train_batch_size": 8, "gradient_clipp1ng": 1,
                               "zero_optimization": {"stage": 7}, "hybrid_engine": {}, "elasticity": {}}))
    run = zeroplan("validate", str(cfg))
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "3 problem(s) in " + str(cfg) in run.stderr
    assert "did you mean 'gradient_clipping'" in run.stderr
    assert "zero_optimization.stage: must be >= 0 and <= 3 (given: 7)" in run.stderr
    assert "elasticity: DeepSpeed removed this and refuses configs that carry it" in run.stderr
    assert "notice: recognised DeepSpeed key 'hybrid_engine'" in run.stderr
    assert run.stdout == ""


def test_validate_set_overrides_and_bad_override(tmp_path):
    run = zeroplan("validate", str(EXAMPLES / "hf_zero2.json"), "--set", "zero_optimization.stage=1")
    assert run.returncode == 0 and json.loads(run.stdout)["zero_optimization"]["stage"] == 1
    run = zeroplan("validate", str(EXAMPLES / "hf_zero2.json"), "--set", "nonsense")
    assert run.returncode == 2 and "not of the form dotted.key=value" in run.stderr


@pytest.mark.parametrize("name", ["missing.json", "empty.json"])
def test_unreadable_inputs_exit_2(tmp_path, name):
    (tmp_path / "empty.json").write_text("")
    run = zeroplan("validate", str(tmp_path / name))
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_every_example_config_validates():
    configs = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
    assert configs
    for path in configs:
        run = zeroplan("validate", str(path))
        assert run.returncode == 0, f"{path.name}: {run.stderr}"


def test_schema_prints_and_writes_json_schema(tmp_path):
    run = zeroplan("schema")
    assert run.returncode == 0
    schema = json.loads(run.stdout)
    assert schema["additionalProperties"] is False
    assert "zero_optimization" in schema["properties"]
    out = tmp_path / "schema.json"
    assert zeroplan("schema", "-o", str(out)).returncode == 0
    assert json.loads(out.read_text()) == schema
    assert not list(tmp_path.glob(".*tmp"))


def _undescribed(node: object, where: str) -> list[str]:
    """Dotted places of every property without a description, anywhere under `node`."""
    if isinstance(node, list):
        return [miss for i, item in enumerate(node) for miss in _undescribed(item, f"{where}[{i}]")]
    if not isinstance(node, dict):
        return []
    missing = [f"{where}.{name}" for name, prop in node.get("properties", {}).items()
               if not (isinstance(prop, dict) and prop.get("description", "").strip())]
    return missing + [miss for key, child in node.items() for miss in _undescribed(child, f"{where}.{key}")]


def test_schema_describes_every_field():
    """Editors show a field's description as its help; the attribute docstrings are the source."""
    run = zeroplan("schema")
    assert run.returncode == 0, run.stderr
    schema = json.loads(run.stdout)
    assert len(schema["$defs"]) > 20 and "ZeroConfig" in schema["$defs"]
    assert "stage" in schema["$defs"]["ZeroConfig"]["properties"]
    assert _undescribed(schema, "schema") == []


def test_schema_to_an_unwritable_place_exits_2(tmp_path):
    (tmp_path / "a_file").write_text("")
    run = zeroplan("schema", "-o", str(tmp_path / "a_file" / "s.json"))
    assert run.returncode == 2 and "cannot write" in run.stderr
