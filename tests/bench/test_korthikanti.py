"""The memory model's per-layer activations equal Korthikanti et al. 2022's equation 2 for the
paper's four shapes (tp 8, dropout), and equation 4 with sequence parallelism, through a real
compile; `zeroplan estimate --tp` reaches it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import korthikanti


@pytest.mark.parametrize("name", list(korthikanti.SHAPES))
def test_per_layer_activations_match_equation_2(name):
    predicted, want = korthikanti.predicted_layer_bytes(name), korthikanti.equation_2(name)
    assert abs(predicted / want - 1) <= korthikanti.TARGET


@pytest.mark.parametrize("name", list(korthikanti.SHAPES))
def test_with_sequence_parallelism_they_match_equation_4(name):
    predicted, want = korthikanti.predicted_layer_bytes(name, sequence_parallel=True), korthikanti.equation_4(name)
    assert abs(predicted / want - 1) <= korthikanti.TARGET


def test_without_dropout_the_masks_are_not_counted():
    assert korthikanti.predicted_layer_bytes("175B", dropout=0.0) < 0.7 * korthikanti.equation_2("175B")


def test_estimate_takes_a_tensor_parallel_degree(tmp_path):
    spec = tmp_path / "175b.json"
    spec.write_text(json.dumps(korthikanti.spec("175B").model_dump()))
    run = subprocess.run([sys.executable, "-m", "zeroplan", "estimate", "--model", str(spec), "--cluster", "h100-80",
                          "--nproc-per-node", "8", "--tp", "8"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "dp 1, tp 8" in run.stdout and "dropout 0.1" in run.stdout
