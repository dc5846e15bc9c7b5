"""Fixtures for the runtime tests: one spawn per world size runs every job of that size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))



@pytest.fixture
def one_thread():
    """References run with one intra-op thread, like every rank, so their arithmetic matches."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
