"""Fixtures for the runtime tests: one spawn per world size runs every job of that size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from rt_cases import run_jobs  # noqa: E402
from rt_harness import run_distributed  # noqa: E402


@pytest.fixture
def one_thread():
    """References run with one intra-op thread, like every rank, so their arithmetic matches."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spawn_jobs(world: int, jobs: list) -> dict:
    """Run jobs on `world` ranks in one spawn; rank 0's per-job results."""
    return run_distributed(run_jobs, world, jobs, timeout=240)[0]


def job_result(results: dict, job_id: str):
    value = results[job_id]
    if isinstance(value, str) and value.startswith("error on rank"):
        pytest.fail(f"job {job_id} failed:\n{value}")
    return value
