"""Peak RSS per rank with the optimizer offloaded (none / cpu / nvme), medium preset, 2 ranks.

Each row is the user's path, run as subprocesses: `zeroplan compile` of a small config with
`--set` overrides for the stage and the offload target, then `zeroplan train` of the plan for
a few steps with `--metrics`; the summary line holds every rank's peak RSS (VmHWM) and the
mean step time (first step excluded). The rows of one stage run back to back in the same
session, so their ratios compare like with like on a shared machine.

On a CPU-only machine `cpu` offload places the master and optimizer state in host memory,
which is where they already are: it should cost what `none` costs. `nvme` keeps them in swap
files under --nvme-path (O_DIRECT where the filesystem allows it), streamed through
`buffer_count` tile buffers of `sub_group_size` elements.

Usage: python -m bench.offload_memory [--stages 2 3] [--steps 4] [--nvme-path DIR] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from zeroplan.schemas.steps import read_summary

from .report import machine_lines, result_path, table, write

CONFIG = """\
train_micro_batch_size_per_gpu: 1
gradient_accumulation_steps: 1
optimizer:
  type: AdamW
  params: {lr: 3.0e-4, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1}
gradient_clipping: 1.0
zero_optimization:
  stage: 2
  allgather_bucket_size: 5.0e6
"""
TARGETS = ("none", "cpu", "nvme")
MIB = 2 ** 20


def compile_args(*, config: Path, stage: int, target: str, nvme_path: Path, sub_group: int, buffers: int,
                 out: Path) -> list[str]:
    sets = [f"zero_optimization.stage={stage}", "zero_optimization.reduce_bucket_size=5e6",
            f"zero_optimization.offload_optimizer.device={target}"]
    if target == "nvme":
        sets += [f"zero_optimization.offload_optimizer.nvme_path={nvme_path}",
                 f"zero_optimization.sub_group_size={sub_group}",
                 f"zero_optimization.offload_optimizer.buffer_count={buffers}"]
    return ["compile", str(config), "--model", "medium", "--cluster", "cpu", "--nproc-per-node", "2",
            *[a for s in sets for a in ("--set", s)], "--out", str(out)]


def zeroplan(args: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "zeroplan", *args], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"zeroplan {shlex.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")


def measure(*, work: Path, stage: int, target: str, steps: int, nvme_path: Path, sub_group: int,
            buffers: int) -> dict:
    out = work / f"z{stage}-{target}"
    config = work / "config.yaml"
    zeroplan(compile_args(config=config, stage=stage, target=target, nvme_path=nvme_path, sub_group=sub_group,
                          buffers=buffers, out=out))
    plan = json.loads((out / "plan.json").read_text())
    metrics = out / "metrics.jsonl"
    zeroplan(["train", str(out / "plan.json"), "--model", "medium", "--steps", str(steps), "--metrics", str(metrics)])
    summary = read_summary(metrics)
    left = sorted(os.listdir(nvme_path))
    return {"stage": stage, "target": target, "kernel": plan["kernels"]["optimizer"],
            "peaks": summary.peak_rss_bytes_per_rank, "step_s": summary.mean_step_time_s,
            "loss_end": summary.loss_end, "swap_left": left}


def to_markdown(rows: list[dict], *, command: str, steps: int, sub_group: int, buffers: int) -> list[str]:
    lines = ["# Peak RSS per rank with optimizer offload (medium preset, 2 CPU ranks)", "",
             *machine_lines({}), f"- command: `{command}`",
             f"- each row: `zeroplan compile` (config below, `--model medium --cluster cpu --nproc-per-node 2`, "
             f"`--set zero_optimization.stage=S --set zero_optimization.reduce_bucket_size=5e6 "
             f"--set zero_optimization.offload_optimizer.device=T`; for nvme also `nvme_path`, "
             f"`sub_group_size={sub_group}`, `buffer_count={buffers}`), then `zeroplan train PLAN --model medium "
             f"--steps {steps} --metrics FILE`; peak RSS = VmHWM of each rank, step time = mean over steps 2..N",
             "- fp32 training, AdamW; the compiler picks the optimizer kernel (cpu_adam with offload, torch_fused "
             "without)", ""]
    headers = ["stage", "offload", "kernel", "peak RSS rank 0 MiB", "peak RSS rank 1 MiB", "max vs none",
               "step s", "step vs none", "loss at last step", "swap files left"]
    body = []
    for r in rows:
        base = next(b for b in rows if b["stage"] == r["stage"] and b["target"] == "none")
        body.append([r["stage"], r["target"], r["kernel"], *(f"{p / MIB:.0f}" for p in r["peaks"]),
                     f"{max(r['peaks']) / max(base['peaks']):.2f}x", f"{r['step_s']:.2f}",
                     f"{r['step_s'] / base['step_s']:.2f}x", f"{r['loss_end']:.4f}", len(r["swap_left"])])
    lines += table(headers, body, right=[True, False, False, True, True, True, True, True, True, True])
    lines += ["", "Config (`config.yaml`):", "", "```yaml", CONFIG.rstrip(), "```"]
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.offload_memory", description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sub-group-size", type=int, default=5_000_000)
    p.add_argument("--buffer-count", type=int, default=2)
    p.add_argument("--nvme-path", type=Path, default=None, help="swap directory (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "bench.offload_memory", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    with tempfile.TemporaryDirectory(prefix="offload-memory-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        work = Path(tmp)
        (work / "config.yaml").write_text(CONFIG)
        nvme = args.nvme_path or work / "swap"
        nvme.mkdir(parents=True, exist_ok=True)
        for stage in args.stages:
            for target in TARGETS:
                row = measure(work=work, stage=stage, target=target, steps=args.steps, nvme_path=nvme,
                              sub_group=args.sub_group_size, buffers=args.buffer_count)
                print(json.dumps(row), flush=True)
                rows.append(row)
    path = write(args.out or result_path("offload_memory"),
                 to_markdown(rows, command=command, steps=args.steps, sub_group=args.sub_group_size,
                             buffers=args.buffer_count))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
