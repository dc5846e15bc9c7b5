"""Shared fixture of the kernel tests: one JIT build of cpu_adam per session."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from zeroplan.runtime.kernels.loader import CPU_ADAM


@pytest.fixture(scope="session")
def cpu_adam_ext():
    """The cpu_adam extension, built once per session (cached across sessions on disk).

    Skips only where no C++ compiler exists; with a compiler, a failed build fails the test.
    """
    module = CPU_ADAM.load()
    if module is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"cpu_adam cannot be built here: {CPU_ADAM.error}")
        pytest.fail(f"cpu_adam failed to build: {CPU_ADAM.error}")
    return module
