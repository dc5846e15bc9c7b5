"""What this machine gives zeroplan, for `zeroplan env` (DeepSpeed's `ds_report`): versions,
the torch build, collective backends, the CPU's vector units, compilers, native kernels and
optional extras. It is what a bug report needs and what decides which kernels run.

Nothing here builds a kernel unless asked (`build=True`): a first build takes about a minute,
so without it an unbuilt kernel is reported as "not built yet" with what building it needs.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.cpp_extension

import zeroplan
from zeroplan.runtime.kernels.loader import CPU_ADAM, CUDA_ADAM, NativeExtension, extensions_root, machine_key

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")
"""/proc/cpuinfo flags that decide which SIMD paths cpu_adam and ATen take (x86, then Arm)."""
EXTRAS = {"transformers": "Hugging Face models", "tensorboard": "zeroplan[monitors]", "wandb": "zeroplan[monitors]",
          "plotly": "zeroplan[report]: the plots of report.html", "optuna-dashboard": "live view of a stored study",
          "psycopg": "a PostgreSQL study, postgresql+psycopg:// URLs",
          "psycopg2": "a PostgreSQL study, postgresql:// URLs", "deepspeed": "zeroplan[bench]: a benchmark peer"}
"""Optional distributions, and what each is for."""


@dataclass(frozen=True)
class Section:
    title: str
    rows: tuple[tuple[str, str], ...]


def environment_report(*, build: bool = False) -> list[Section]:
    """Every section of `zeroplan env`; `build`: build native kernels that are not built yet."""
    return [_versions(), _torch_build(), _cpu(), _compilers(), _kernels(build=build), _extras()]


def render_text(sections: list[Section]) -> str:
    width = max(len(name) for s in sections for name, _ in s.rows)
    lines = []
    for s in sections:
        lines += [s.title] + [f"  {name:<{width}}  {value}" for name, value in s.rows] + [""]
    return "\n".join(lines)


def _versions() -> Section:
    core = ("optuna", "pydantic", "pandas")
    return Section("zeroplan", (
        ("zeroplan", f"{zeroplan.__version__} ({Path(zeroplan.__file__).parent})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        *((name, _installed(name) or "not installed") for name in core)))


def _torch_build() -> Section:
    if torch.version.cuda:
        kind = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        kind = f"ROCm (HIP {torch.version.hip})"
    else:
        kind = "CPU only"
    rows = [("torch", f"{torch.__version__} ({Path(torch.__file__).parent})"), ("build", kind)]
    if torch.backends.cudnn.is_available():
        rows.append(("cuDNN", str(torch.backends.cudnn.version())))
    if torch.version.cuda and hasattr(torch.cuda, "nccl"):
        rows.append(("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        rows.append(("devices", f"{torch.cuda.device_count()} x {', '.join(names)}"))
    elif torch.version.cuda:
        rows.append(("devices", "none: torch sees no GPU"))
    backends = {"gloo": dist.is_available() and dist.is_gloo_available(),
                "nccl": dist.is_available() and dist.is_nccl_available(),
                "mpi": dist.is_available() and dist.is_mpi_available()}
    rows.append(("collectives", ", ".join(f"{b} {'yes' if ok else 'no'}" for b, ok in backends.items())))
    rows.append(("C++11 ABI", "yes" if torch.compiled_with_cxx11_abi() else "no"))
    return Section("torch", tuple(rows))


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> set[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`); empty off Linux."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu() -> Section:
    flags = cpu_flags()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    known = [f for f in VECTOR_FLAGS if f in flags] or ["none of " + ", ".join(VECTOR_FLAGS)]
    return Section("CPU", (
        ("model", cpu_model()),
        ("cores", f"{os.cpu_count()} ({usable} usable by this process)"),
        ("vector units", " ".join(known)),
        ("ATen capability", torch.backends.cpu.get_cpu_capability()),
    ))


def _tool(command: str, *, pick: str = "") -> str:
    """`command --version`'s first line (or the first line containing `pick`), with its path."""
    path = shutil.which(command)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{path}: --version failed ({type(e).__name__})"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and pick in ln]
    return f"{lines[0] if lines else '?'} ({path})"


def _compilers() -> Section:
    cxx = os.environ.get("CXX", "c++")
    cuda_home = torch.utils.cpp_extension.CUDA_HOME
    return Section("compilers", (
        ("gcc", _tool("gcc")),
        (f"C++ (CXX={cxx})", _tool(cxx)),
        ("nvcc", _tool("nvcc", pick="release")),
        ("ninja", _tool("ninja")),
        ("CUDA_HOME (torch)", cuda_home or "none (the CUDA kernel needs a CUDA build of torch and nvcc)"),
    ))


def kernel_status(extension: NativeExtension, *, build: bool) -> str:
    """Whether a native kernel loads here, without building it unless `build`."""
    built = extension.built()
    if built is None and not build:
        missing = extension.missing_tool()
        if missing:
            return f"cannot be built here: {missing}"
        return "not built yet (builds on first use, about a minute; `zeroplan env --build` builds it now)"
    if extension.load() is None:
        return f"does not load: {extension.error}"
    return f"loads (build {extension.build_dir().name})"


def _kernels(*, build: bool) -> Section:
    cpu = kernel_status(CPU_ADAM, build=build)
    if cpu.startswith("loads"):
        from zeroplan.runtime.kernels import cpu_simd_paths

        cpu += f"; SIMD paths: {', '.join(cpu_simd_paths())}"
    cuda = (kernel_status(CUDA_ADAM, build=build) if torch.version.cuda
            else "not for this torch: it is a CPU-only build")
    return Section("native kernels", (
        ("cpu_adam", cpu),
        ("cuda_fused (multi-tensor Adam)", cuda),
        ("build cache", str(extensions_root() / machine_key())),
    ))


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _extras() -> Section:
    rows = []
    for name, purpose in EXTRAS.items():
        version = _installed(name)
        rows.append((name, f"{version}" if version else f"not installed ({purpose})"))
    return Section("optional packages", tuple(rows))
