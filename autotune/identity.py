"""What a study measured, as one key, so that nothing is ever reused across a different one.

A study's results hold only for what its trials ran: the config (less the tuner's own
bookkeeping: budget, storage, names), the model, the world layout (nodes x processes), the
machine, the zeroplan version, the search space and how a trial is measured. `study_identity`
records each of these as a readable part; its digest keys the study (study.py opens a new
study beside one of another identity, and resumes one of the same identity), and the best
plan carries the digest and the model part (`Plan.provenance.study_identity`,
`model_identity`), so `zeroplan train` can refuse a plan tuned for another model
(`model_mismatch`).

The model part (`model_identity`):
- a preset or a ModelSpec JSON (`--model tiny`): its shape;
- your builder (`--model file.py:build`): the builder reference (a file path made absolute)
  and its measured shape and parameter count;
- a training script (`--script train.py ARGS`): the script's path, a hash of its content,
  and its arguments (which may choose the model), with the shape its model-info run measured.
A shape digest leaves out the spec's name (a builder's spec is named by the reference as it was
typed, `./m.py:build` or `m.py:build`), so the same model typed two ways is one model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import zeroplan
from zeroplan.schemas import ClusterSpec, ModelSpec, TrainConfig
from zeroplan.schemas.model import is_model_function

from .models import TrialWorkload
from .space import Dimension

NOT_MEASURED_CONFIG = ("autotuning", "json_schema")
"""Config blocks that do not change what a trial measures: the tuner's settings (what does
change a measurement, the objective, steps, memory margin and space, is its own part)."""
CLUSTER_FIGURES = {"rates", "rates_source", "notes", "runtime_overhead_bytes", "nvme_free_bytes", "nnodes",
                   "nproc_per_node"}
"""Cluster fields left out of its part: the measured figures (they only rank candidates, and a
new probe of the same machine gives slightly different ones) and the shape (the world part)."""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def shape_digest(spec: ModelSpec) -> str:
    return _digest(spec.model_dump(mode="json", exclude={"name"}))[:16]


def model_identity(workload: TrialWorkload, spec: ModelSpec | None) -> dict[str, str]:
    """The model part of a study's identity (see the module docstring); without `spec` (what
    `zeroplan train` knows before it builds anything) a builder or script has no shape."""
    shape = {"name": spec.name, "shape": shape_digest(spec), "params": str(spec.total_params)} if spec else {}
    if workload.script:
        script = (workload.cwd / workload.script[0]).resolve()
        return {"kind": "script", "ref": str(script), "content": _file_digest(script),
                "args": json.dumps(list(workload.script[1:])), **shape}
    if is_model_function(workload.model):
        return {"kind": "builder", "ref": workload.model_ref(), **shape}
    return {"kind": "spec", "ref": workload.model, **(shape or _spec_shape(workload.model))}


def _spec_shape(ref: str) -> dict[str, str]:
    spec = ModelSpec.load(ref)
    return {"name": spec.name, "shape": shape_digest(spec), "params": str(spec.total_params)}


def study_identity(*, config: TrainConfig, model: dict[str, str], nnodes: int, nproc_per_node: int,
                   cluster: ClusterSpec, dims: Sequence[Dimension], measurement: dict[str, Any]) -> dict[str, Any]:
    """Every part of what a study measures, readable; `identity_digest` keys it.

    `measurement`: how a trial's value is taken (objective, warm-up and measured steps, the
    memory safety margin that prunes candidates)."""
    body = config.model_dump(mode="json", exclude=set(NOT_MEASURED_CONFIG))
    machine = cluster.model_dump(mode="json", exclude=CLUSTER_FIGURES)
    return {"config": _digest(body)[:16], "model": model, "world": f"{nnodes} node(s) x {nproc_per_node} process(es)",
            "cluster": f"{cluster.name} ({_digest(machine)[:12]})", "zeroplan": zeroplan.__version__,
            "space": _digest([repr(d) for d in dims])[:16],
            "measurement": ", ".join(f"{k} {v}" for k, v in sorted(measurement.items()))}


def identity_digest(identity: dict[str, Any]) -> str:
    return _digest(identity)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The parts two identities differ in, each as "part: old -> new" (the model by its reference)."""
    out = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part), new.get(part)
        if a != b:
            out.append(f"{part}: {describe(a) if part == 'model' else a} -> {describe(b) if part == 'model' else b}")
    return out


def describe(model: dict[str, str] | None) -> str:
    """A model part for a person: "/path/m.py:build (533,386 parameters)"."""
    if not model:
        return "unrecorded"
    params = f"{int(model['params']):,} parameters" if model.get("params") else ""
    extra = [params] + ([f"arguments {model['args']}"] if model.get("args") not in (None, "[]") else [])
    extra = [e for e in extra if e]
    return model.get("ref", "?") + (f" ({', '.join(extra)})" if extra else "")


def model_mismatch(recorded: dict[str, str], given: TrialWorkload) -> str | None:
    """Why the model `given` to `zeroplan train` is not the one a plan was tuned for, or None.

    Compared where it can be known before anything is built: a preset or spec by its shape, a
    builder by its reference (a plan copied to another machine, whose builder file is not there,
    by the file's name and function), a script by its path or content. A script given for a plan
    tuned with `--model` may build that model: not refused. A plan with no record (compiled, not
    tuned) is not checked."""
    if not recorded:
        return None
    now = model_identity(given, None)
    if recorded["kind"] == "script":
        if now["kind"] != "script":
            return f"it was tuned with the script {recorded['ref']}; run it as `zeroplan train PLAN -- SCRIPT ARGS`"
        same = now["ref"] == recorded["ref"] or now["content"] == recorded.get("content")
        return None if same else f"the script {now['ref']} is not {recorded['ref']} (nor a copy of it)"
    if now["kind"] == "script":
        return None
    if recorded["kind"] == "spec" or now["kind"] == "spec":
        if now["kind"] == recorded["kind"] and now.get("shape") == recorded.get("shape"):
            return None
        return f"{describe(now)} is another model"
    if now["ref"] == recorded["ref"] or _moved(recorded["ref"], now["ref"]):
        return None
    return f"the builder {now['ref']} is another model"


def _moved(recorded: str, given: str) -> bool:
    """A builder file named as recorded but elsewhere, the recorded file being absent here."""
    old_file, _, old_fn = recorded.rpartition(":")
    new_file, _, new_fn = given.rpartition(":")
    return (old_fn == new_fn and "/" in old_file and not Path(old_file).exists()
            and Path(old_file).name == Path(new_file).name)
