"""Optimizer-step throughput on CPU: zeroplan's cpu_adam against torch.optim and DeepSpeed.

What is measured, per size (fp32 parameters) and thread count:
- one Adam step of each system, median ms and effective GB/s. Adam reads param, grad, m, v
  and writes param, m, v: 28 bytes per element (30 with a bf16 copy of the parameters);
- the whole ZeRO shard step: unscale by the loss scale, clip to a global norm, Adam, bf16
  copy. cpu_adam does it as one norm pass plus one fused pass (`grad_scale` carries
  clip_coef / loss_scale); plain PyTorch as `mul_` + `clip_grad_norm_` + `AdamW(fused=True)` +
  `copy_`;
- the machine's memory bandwidth, as a large `copy_` (read + write bytes over time), the
  ceiling every memory-bound step is judged against.

Systems run alternately (A B C, then C B A, ...) so that drift on a shared machine hits them
alike, and each ratio is the median over rounds of the ratio within a round (a paired
comparison, steadier under load than a ratio of medians). The gradient is restored (untimed)
before each step so repeated unscaling cannot push it into denormals. DeepSpeedCPUAdam is
included only if deepspeed is importable (run from an environment that has it, with this
checkout installed: the benchmark refuses to time another tree's kernel sources).

Usage: python -m bench.optimizer_kernels [--sizes 25e6 100e6] [--threads 1 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from zeroplan.runtime.kernels import adam_step, cpu_simd_paths
from zeroplan.runtime.kernels.loader import CPU_ADAM, CSRC_DIR

from .report import RESULTS, cpu_model

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
LOSS_SCALE, MAX_NORM = 1024.0, 1.0


def copy_bandwidth(numel: int, reps: int) -> float:
    """GB/s of dst.copy_(src) on fp32 buffers: bytes read plus bytes written over the fastest
    repetition, the ceiling (medians elsewhere; on a shared machine the best copy is the one
    least disturbed)."""
    src, dst = torch.rand(numel), torch.empty(numel)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * 4 * numel / min(times) / 1e9


class Flat:
    """One system's flat fp32 state: param, grad (restored from `source` each step), bf16 copy,
    and the moments when the system does not keep its own (torch.optim does)."""

    def __init__(self, source: torch.Tensor, param: torch.Tensor, *, moments: bool) -> None:
        self.source = source
        self.param = torch.nn.Parameter(param.clone())
        self.param.grad = source.clone()
        self.exp_avg = torch.zeros_like(param) if moments else None
        self.exp_avg_sq = torch.zeros_like(param) if moments else None
        self.bf16 = torch.empty_like(param, dtype=torch.bfloat16)
        self.step = 0

    def restore_grad(self) -> None:
        self.param.grad.copy_(self.source)


def cpu_adam_step(flat: Flat, *, bf16: bool, threads: int) -> None:
    flat.step += 1
    adam_step(param=flat.param.data, grad=flat.param.grad, exp_avg=flat.exp_avg, exp_avg_sq=flat.exp_avg_sq,
              step=flat.step, decoupled=True, bf16_out=flat.bf16 if bf16 else None, kernel="cpu_adam",
              threads=threads, **HYPER)


def torch_optimizer(flat: Flat, **flags) -> Callable[[], None]:
    opt = torch.optim.AdamW([flat.param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], **flags)
    return opt.step


@functools.cache
def deepspeed_cpu_adam() -> type | None:
    """DeepSpeedCPUAdam if deepspeed imports (it is no dependency of zeroplan); one notice if not."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # not installed, or its own JIT build failed
        print(f"notice: DeepSpeedCPUAdam skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    return DeepSpeedCPUAdam


def deepspeed_optimizer(flat: Flat) -> Callable[[], None] | None:
    DeepSpeedCPUAdam = deepspeed_cpu_adam()
    if DeepSpeedCPUAdam is None:
        return None
    opt = DeepSpeedCPUAdam([flat.param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                           eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], adamw_mode=True)
    return opt.step


def fused_shard_step(flat: Flat, threads: int) -> None:
    """cpu_adam's shard step: a norm pass over the gradient, then one fused pass."""
    norm = torch.linalg.vector_norm(flat.param.grad).item() / LOSS_SCALE
    clip = min(1.0, MAX_NORM / (norm + 1e-6))
    flat.step += 1
    adam_step(param=flat.param.data, grad=flat.param.grad, exp_avg=flat.exp_avg, exp_avg_sq=flat.exp_avg_sq,
              step=flat.step, decoupled=True, grad_scale=clip / LOSS_SCALE, bf16_out=flat.bf16,
              kernel="cpu_adam", threads=threads, **HYPER)


def plain_shard_step(flat: Flat, step: Callable[[], None]) -> None:
    """Plain PyTorch: unscale, clip_grad_norm_, AdamW(fused=True), bf16 copy."""
    flat.param.grad.mul_(1.0 / LOSS_SCALE)
    torch.nn.utils.clip_grad_norm_([flat.param], MAX_NORM)
    step()
    flat.bf16.copy_(flat.param.data)


def alternate(systems: dict[str, tuple[Flat, Callable[[], None]]], reps: int) -> dict[str, list[float]]:
    """Seconds per step of each system over `reps` rounds, after one untimed warm-up round; the
    order reverses every round so that no system always follows the same one."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(reps + 1):
        order = list(systems) if rep % 2 == 0 else list(reversed(systems))
        for name in order:
            flat, run = systems[name]
            flat.restore_grad()
            t0 = time.perf_counter()
            run()
            if rep:
                times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], baseline: str, numel: int, threads: int, *, moved: bool) -> list[dict]:
    """One row per system: median seconds, and the median of the per-round ratios
    baseline time / system time (above 1: faster than the baseline)."""
    rows = []
    for name, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(times[baseline], ts))
        nbytes = (30 if "bf16" in name else 28) * numel if moved else None
        rows.append(dict(size=numel, threads=threads, system=name, seconds=statistics.median(ts),
                         ratio=ratio, bytes=nbytes))
    return rows


def bench_size(numel: int, threads: int, reps: int) -> list[dict]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(numel, generator=gen)
    source = torch.randn(numel, generator=gen) * LOSS_SCALE
    flats = {name: Flat(source, param, moments=name == "cpu_adam") for name in ("cpu_adam", "foreach", "fused")}
    systems = {
        "cpu_adam": (flats["cpu_adam"], lambda: cpu_adam_step(flats["cpu_adam"], bf16=False, threads=threads)),
        "cpu_adam + bf16 copy": (flats["cpu_adam"], lambda: cpu_adam_step(flats["cpu_adam"], bf16=True, threads=threads)),
        "torch AdamW(foreach=True)": (flats["foreach"], torch_optimizer(flats["foreach"], foreach=True)),
        "torch AdamW(fused=True)": (flats["fused"], torch_optimizer(flats["fused"], fused=True)),
    }
    ds_flat = Flat(source, param, moments=False)
    ds_step = deepspeed_optimizer(ds_flat)
    if ds_step is not None:
        systems["DeepSpeedCPUAdam"] = (ds_flat, ds_step)
    plain = "shard step: PyTorch (mul_ + clip + fused + copy_)"
    shard = alternate({
        "shard step: cpu_adam (norm + 1 fused pass)": (flats["cpu_adam"], lambda: fused_shard_step(flats["cpu_adam"], threads)),
        plain: (flats["fused"], lambda: plain_shard_step(flats["fused"], systems["torch AdamW(fused=True)"][1])),
    }, reps)
    return (summarise(alternate(systems, reps), "torch AdamW(fused=True)", numel, threads, moved=True)
            + summarise(shard, plain, numel, threads, moved=False))


def checked_kernel_sources() -> Path:
    """The kernel sources zeroplan builds from, which must be this checkout's `csrc/`: an
    environment whose zeroplan is installed from another tree would time that tree's kernel."""
    ours = Path(__file__).resolve().parents[1] / "csrc"
    if CSRC_DIR != ours:
        raise SystemExit(f"error: zeroplan.csrc resolves to {CSRC_DIR}, not this checkout's {ours}; "
                         f"install this checkout into the environment (pip install --no-deps -e {ours.parent})")
    return ours


def deepspeed_line() -> str:
    try:
        import deepspeed
    except Exception as e:
        return f"- deepspeed: not importable here ({type(e).__name__}), so no DeepSpeedCPUAdam rows"
    return f"- deepspeed {deepspeed.__version__} (DeepSpeedCPUAdam, adamw_mode=True, its JIT build for this machine)"


def to_markdown(rows: list[dict], bandwidth: dict[int, float], command: str, reps: int,
                load: tuple[float, float]) -> str:
    lines = [
        f"# Optimizer kernels, {dt.date.today().isoformat()}",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible; cpu_adam SIMD path: {cpu_simd_paths()[0]}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
        deepspeed_line(),
        f"- cpu_adam built from {checked_kernel_sources()} into {CPU_ADAM.build_dir()}",
        f"- command: `{command}`",
        f"- {reps} timed steps per system (median), systems alternated (order reversed every round),"
        " one warm-up round; the machine was shared with other work, so absolute figures carry noise",
        f"- 1-minute load average ({os.cpu_count()} cores): {load[0]:.1f} at the start, {load[1]:.1f} at the end",
        "- memory bandwidth (`copy_` of 1 GiB fp32, read + write, best of the reps): "
        + ", ".join(f"{t} thread(s): {bw:.1f} GB/s" for t, bw in sorted(bandwidth.items())),
        "- Adam moves 28 bytes per element (30 with the bf16 copy); ratio = median over rounds of"
        " torch fused time / this system's time in the same round (shard steps: plain PyTorch"
        " shard step / this one); above 1.00x is faster than torch fused",
        "",
        "| params | threads | system | ms/step | GB/s | % of copy bw | ratio |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        gbs = r["bytes"] / r["seconds"] / 1e9 if r["bytes"] else None
        pct = f"{100 * gbs / bandwidth[r['threads']]:.0f}%" if gbs else "-"
        lines.append(f"| {r['size'] / 1e6:.0f}M | {r['threads']} | {r['system']} | {1e3 * r['seconds']:.1f} | "
                     f"{f'{gbs:.1f}' if gbs else '-'} | {pct} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25e6, 100e6], help="fp32 parameters")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=7, help="timed steps per system")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: bench/results/)")
    args = parser.parse_args(argv)
    command = "python -m bench.optimizer_kernels " + shlex.join(argv if argv is not None else sys.argv[1:])
    checked_kernel_sources()
    load_start = os.getloadavg()[0]
    bandwidth = {}
    for t in args.threads:
        torch.set_num_threads(t)
        bandwidth[t] = copy_bandwidth(2**28, 2 * args.reps)
    rows = []
    for size in args.sizes:
        for t in args.threads:
            print(f"{size / 1e6:.0f}M parameters, {t} thread(s) ...", file=sys.stderr)
            rows += bench_size(int(size), t, args.reps)
    text = to_markdown(rows, bandwidth, command.strip(), args.reps, (load_start, os.getloadavg()[0]))
    out = args.out or RESULTS / f"optimizer_kernels-{dt.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
