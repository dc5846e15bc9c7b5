"""Just-in-time build, cache and load of zeroplan's native extensions.

Why JIT: the kernels are a few hundred lines of C++ whose best code depends on the CPU and
the torch ABI of the machine they run on; building them there with
`torch.utils.cpp_extension.load` (ninja) avoids shipping per-platform binaries. The x86
paths are chosen at run time (see csrc/cpu_adam/cpu_adam.cpp), so one build serves every
CPU of an architecture.

Where: `$TORCH_EXTENSIONS_DIR` if set, else `$XDG_CACHE_HOME/zeroplan/torch_extensions`
(default `~/.cache/zeroplan/torch_extensions`), then a folder per machine key (OS,
architecture, Python and torch version, which includes its CUDA variant), then one per
extension named with a hash of its sources and flags, so an edited source never loads a
stale binary. A process that finds a finished build imports it without invoking the
compiler; concurrent builders (one per rank) serialise on torch's lock file in that folder.

Sources: the data package `zeroplan.csrc` (folder `csrc/`), located through its `__file__`,
which is the source tree in an editable install and site-packages in a wheel.

Failure is not fatal: `NativeExtension.load()` returns None and keeps the reason, and the
caller (`zeroplan.runtime.kernels.select`) falls back to a pure-PyTorch kernel with one notice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
import torch.utils.cpp_extension

import zeroplan.csrc

log = logging.getLogger(__name__)

CSRC_DIR = Path(zeroplan.csrc.__file__).resolve().parent
"""Folder holding the C++/CUDA sources (`csrc/` of the repository or of the installed package)."""


class KernelWarning(UserWarning):
    """A native kernel cannot run here and a slower pure-PyTorch one is used instead."""


def extensions_root() -> Path:
    """Cache root for built extensions: `$TORCH_EXTENSIONS_DIR`, else under the user cache."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "zeroplan" / "torch_extensions"


def machine_key() -> str:
    """What a binary depends on: OS, architecture, Python ABI and the torch build."""
    system = platform.system().lower()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"{system}-{platform.machine()}-{py}-torch{torch.__version__}"


class NativeExtension:
    """One JIT-built extension; `load()` builds at most once per process and memoises."""

    def __init__(
        self,
        *,
        name: str,
        sources: Sequence[str],
        cflags: Sequence[str],
        ldflags: Sequence[str] = (),
        cuda_cflags: Sequence[str] = (),
        with_cuda: bool = False,
    ) -> None:
        self.name = name
        self.sources = [CSRC_DIR / s for s in sources]
        self.cflags = list(cflags)
        self.ldflags = list(ldflags)
        self.cuda_cflags = list(cuda_cflags)
        self.with_cuda = with_cuda
        self.error: str | None = None
        """Why the last `load()` failed, in one line; None while it has not failed."""
        self._module: ModuleType | None = None
        self._tried = False
        self._lock = threading.Lock()

    def load(self) -> ModuleType | None:
        """The built module, or None (with `self.error` set) when it cannot be built here."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self._module = self._load_or_build()
            return self._module

    def build_dir(self) -> Path:
        """Cache folder of this exact source and flag set on this machine key."""
        digest = hashlib.sha256()
        for path in sorted(self.sources + self._headers()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        for flag in self.cflags + self.ldflags + self.cuda_cflags:
            digest.update(flag.encode() + b"\0")
        return extensions_root() / machine_key() / f"{self.name}_{digest.hexdigest()[:12]}"

    def built(self) -> Path | None:
        """The finished build of these sources on this machine key, or None; never builds
        (a build another process is still writing holds a `lock` file beside it)."""
        build_dir = self.build_dir()
        path = build_dir / f"{build_dir.name}.so"
        return path if path.exists() and not (build_dir / "lock").exists() else None

    def _headers(self) -> list[Path]:
        folders = {s.parent for s in self.sources}
        return [h for folder in folders for h in folder.glob("*.h")]

    def _load_or_build(self) -> ModuleType | None:
        missing = self.missing_tool()
        try:
            build_dir = self.build_dir()
            built = self.built()
            if built is not None:
                return _import_built(build_dir.name, built)
            if missing:
                self.error = missing
                return None
            build_dir.mkdir(parents=True, exist_ok=True)
            return self._build(build_dir.name, build_dir)
        except Exception as e:  # a broken toolchain fails in many ways; none may crash training
            self.error = f"building it failed: {_one_line(e)}"
            log.debug("building %s failed", self.name, exc_info=True)
            return None

    def missing_tool(self) -> str | None:
        """What building needs and this machine lacks (a C++ compiler, ninja, nvcc), or None."""
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return f"no C++ compiler: CXX={compiler!r} is not on PATH"
        if not torch.utils.cpp_extension.is_ninja_available():
            return "ninja is not installed (pip install ninja)"
        if self.with_cuda and torch.utils.cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
        return None

    def _build(self, module_name: str, build_dir: Path) -> ModuleType:
        log.info("building %s in %s (first use on this machine; about a minute)", self.name, build_dir)
        # torch warns about compiler versions while building; the notice for a failure is ours.
        # Copies of the flag lists: torch appends its own link flags to the list it is given,
        # which would change build_dir()'s hash for the rest of this process.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = torch.utils.cpp_extension.load(
                name=module_name,
                sources=[str(s) for s in self.sources],
                extra_cflags=list(self.cflags),
                extra_ldflags=list(self.ldflags),
                extra_cuda_cflags=list(self.cuda_cflags),
                extra_include_paths=[str(s.parent) for s in self.sources],
                build_directory=str(build_dir),
                with_cuda=self.with_cuda,
                verbose=False,
            )
        for w in caught:
            log.debug("while building %s: %s", self.name, w.message)
        return module


def _import_built(module_name: str, path: Path) -> ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def _one_line(error: BaseException) -> str:
    """The gist of a build error: its type and first meaningful line, at most 300 characters."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    text = (errors or lines or [""])[0]
    return f"{type(error).__name__}: {text}"[:300]


CPU_ADAM = NativeExtension(
    name="zeroplan_cpu_adam",
    sources=[
        "cpu_adam/cpu_adam.cpp",
        "cpu_adam/adam_scalar.cpp",
        "cpu_adam/adam_avx2.cpp",
        "cpu_adam/adam_avx512.cpp",
    ],
    # No -march: SIMD paths carry their own target attributes and are picked at run time.
    # -ffp-contract=off keeps the operation order of adam_math.h (torch.optim's).
    cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
    ldflags=["-fopenmp"],
)

CUDA_ADAM = NativeExtension(
    name="zeroplan_cuda_adam",
    sources=["cuda/multi_tensor_adam.cpp", "cuda/multi_tensor_adam_kernel.cu"],
    cflags=["-O3"],
    # --fmad=false: same reason as -ffp-contract=off on the CPU side.
    cuda_cflags=["-O3", "--fmad=false"],
    with_cuda=True,
)
