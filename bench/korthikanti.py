"""The memory model's activations against Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), equation 2: with tensor parallelism t and no
recomputation, one transformer layer keeps sbh(10 + 24/t + 5as/(ht)) bytes (16-bit, dropout);
with sequence parallelism too (section 4.2.2, equation 4), sbh(34/t + 5as/(ht)).

For the paper's four shapes (its Table 3: 22B, 175B, 530B, 1T; s = 2048, tp 8) each row is a
real compile of a bf16 plan with dropout on the cluster preset, and the per-layer activations
are read back from the plan's estimate (activations minus the output layer's, over the layers)
and compared with the equation: once with tensor parallelism alone, once with
parallel.sequence_parallel. The same shapes without dropout show what leaving the masks and the
dropped-out softmax out of the count would under-predict.

Usage: python -m bench.korthikanti [--cluster h100-80] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from zeroplan.compiler import compile as compile_plan
from zeroplan.compiler.memory import head_activation_bytes
from zeroplan.schemas import CLUSTER_PRESETS, ConfigWarning, ModelSpec, validate_config

from .report import result_path, table, write

SEQ, TP, VOCAB = 2048, 8, 51200
SHAPES = {  # name: (attention heads, hidden, layers), Korthikanti et al. 2022, Table 3
    "22B": (64, 6144, 48),
    "175B": (96, 12288, 96),
    "530B": (128, 20480, 105),
    "1T": (160, 25600, 128),
}
TARGET = 0.02
"""Largest |predicted / equation - 1| asked of the per-layer activations."""


def spec(name: str, *, dropout: float = 0.1) -> ModelSpec:
    heads, hidden, layers = SHAPES[name]
    return ModelSpec(name=name, layers=layers, hidden=hidden, heads=heads, ffn=4 * hidden, vocab=VOCAB,
                     seq_len=SEQ, dropout=dropout)


def equation_2(name: str, *, micro: int = 1, tp: int = TP) -> int:
    """Korthikanti et al. 2022, equation 2, in bytes."""
    heads, hidden, _ = SHAPES[name]
    sbh = SEQ * micro * hidden
    return round(sbh * (10 + 24 / tp + 5 * heads * SEQ / (hidden * tp)))


def equation_4(name: str, *, micro: int = 1, tp: int = TP) -> int:
    """Korthikanti et al. 2022, equation 4 (tensor and sequence parallelism), in bytes."""
    heads, hidden, _ = SHAPES[name]
    sbh = SEQ * micro * hidden
    return round(sbh * (34 / tp + 5 * heads * SEQ / (hidden * tp)))


def predicted_layer_bytes(name: str, *, cluster: str = "h100-80", micro: int = 1, dropout: float = 0.1,
                          sequence_parallel: bool = False) -> int:
    """Per-layer activation bytes of a compiled tp-8 bf16 plan."""
    model = spec(name, dropout=dropout)
    data = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 1}, "parallel": {"tp": TP, "sequence_parallel": sequence_parallel}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        config = validate_config(data, source=f"{name} tp {TP}")
    plan = compile_plan(config, model, CLUSTER_PRESETS[cluster], nnodes=1, nproc_per_node=TP)
    head = head_activation_bytes(seq=SEQ, micro=micro, hidden=model.hidden, vocab=VOCAB, tp=TP, element_bytes=2,
                                 sequence_parallel=sequence_parallel)
    return (plan.estimates.memory_per_rank["activations"] - head) // model.layers


def _rows(cluster: str, *, sequence_parallel: bool) -> tuple[list[tuple], float]:
    """One row per shape against equation 2 (4 with sequence parallelism), and the largest |error|."""
    rows, worst = [], 0.0
    equation = equation_4 if sequence_parallel else equation_2
    for name in SHAPES:
        layer = predicted_layer_bytes(name, cluster=cluster, sequence_parallel=sequence_parallel)
        without = predicted_layer_bytes(name, cluster=cluster, dropout=0.0, sequence_parallel=sequence_parallel)
        want = equation(name)
        error = layer / want - 1
        worst = max(worst, abs(error))
        rows.append((name, f"{want / 2**20:,.1f}", f"{layer / 2**20:,.1f}", f"{error:+.2%}",
                     f"{without / 2**20:,.1f}", f"{without / want:.2f}x"))
    return rows, worst


def main(argv: list[str] | None = None) -> list[tuple]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cluster", default="h100-80", choices=sorted(CLUSTER_PRESETS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows, worst = _rows(args.cluster, sequence_parallel=False)
    sp_rows, sp_worst = _rows(args.cluster, sequence_parallel=True)
    worst = max(worst, sp_worst)
    right = [False, True, True, True, True, True]
    lines = ["# Activation memory against Korthikanti et al. 2022, equations 2 and 4", "",
             f"Command: `python -m bench.korthikanti {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"s = {SEQ}, micro-batch 1, tp {TP}, bf16, no recomputation, ZeRO-1 on one {args.cluster} node. "
             "Per-layer MiB: the equation's, the compiled plan's with dropout 0.1 (activations minus the output "
             "layer's, over the layers), and the plan's for the same shape without dropout.", "",
             "Tensor parallelism (equation 2, sbh(10 + 24/t + 5as/(ht))):", "",
             *table(["shape", "eq. 2 MiB/layer", "plan MiB/layer", "error", "no dropout MiB/layer",
                     "no dropout / eq. 2"], rows, right=right),
             "", "Tensor and sequence parallelism, `parallel.sequence_parallel` (equation 4, sbh(34/t + 5as/(ht))):", "",
             *table(["shape", "eq. 4 MiB/layer", "plan MiB/layer", "error", "no dropout MiB/layer",
                     "no dropout / eq. 4"], sp_rows, right=right),
             "", f"Largest |error| with dropout: {worst:.2%} (target {TARGET:.0%}: "
             f"{'met' if worst <= TARGET else 'NOT met'})."]
    path = write(result_path("korthikanti") if args.out is None else Path(args.out), lines)
    print("\n".join(lines))
    print(f"wrote {path}")
    return rows + sp_rows


if __name__ == "__main__":
    main()
