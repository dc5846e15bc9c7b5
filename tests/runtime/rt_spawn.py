"""Spawning helpers of the runtime tests (a module, not conftest: conftest names collide across folders)."""

from __future__ import annotations

import pytest
from rt_cases import run_jobs
from rt_harness import run_distributed


def spawn_jobs(world: int, jobs: list) -> dict:
    """Run jobs on `world` ranks in one spawn; rank 0's per-job results."""
    return run_distributed(run_jobs, world, jobs, timeout=240)[0]


def job_result(results: dict, job_id: str):
    value = results[job_id]
    if isinstance(value, str) and value.startswith("error on rank"):
        pytest.fail(f"job {job_id} failed:\n{value}")
    return value
