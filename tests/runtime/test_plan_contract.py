"""The plan is a contract (DESIGN, "The Plan"): every field the compiler writes is read by the
runtime, except the metadata and the DeepSpeed pass-through section, which the runtime must
not read. Reads are traced while 2 ranks train plans that together use every option
(rt_plan_reads.py); a field nobody reads fails here with its name."""

from __future__ import annotations

import functools
import typing

from pydantic import BaseModel

from rt_spawn import job_result, spawn_jobs
from zeroplan.schemas import Plan
from zeroplan.schemas.plan import DeepSpeedPassThrough

NOT_FOR_THE_RUNTIME = {
    ("Plan", "plan_version"): "checked by Plan.load",
    ("Plan", "estimates"): "the compiler's predictions, compared with measurements by tests and the tuner",
    ("Plan", "provenance"): "where the plan came from (config hash, study, trial)",
    ("Plan", "deepspeed"): "the ds_config.json export's pass-through section",
    ("BatchPlan", "derived"): "which batch keys the config left to the compiler, for the report",
    ("PrecisionPlan", "master_dtype"): "its one allowed value, fp32, is what the runtime keeps",
    ("LayoutPlan", "crosses_nodes"): "follows from order and nodes (the plan checks it); for the reader, the report "
                                      "and the cost model's inter-node rates",
}


def _fields(model: type[BaseModel], seen: set) -> set[tuple[str, str]]:
    """(class name, field) of `model` and of every plan section below it."""
    out = set()
    for name, field in model.model_fields.items():
        out.add((model.__name__, name))
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                seen.add(arg)
                out |= _fields(arg, seen)
    return out


@functools.lru_cache(maxsize=None)
def _reads(root: str) -> set:
    return job_result(spawn_jobs(2, [("reads", "rt_plan_reads:plan_reads", {"root": root})]), "reads")


def test_every_plan_field_is_read_by_the_runtime(tmp_path_factory):
    reads = _reads(str(tmp_path_factory.mktemp("reads")))
    wanted = {f for f in _fields(Plan, set()) if f not in NOT_FOR_THE_RUNTIME
              and f[0] not in ("Estimates", "Provenance", DeepSpeedPassThrough.__name__)}
    unread = sorted(wanted - reads)
    assert not unread, f"plan fields no runtime code read: {unread}"
    passed_through = sorted(r for r in reads if r[0] == DeepSpeedPassThrough.__name__)
    assert not passed_through, f"the pass-through section is read by the runtime: {passed_through}"
