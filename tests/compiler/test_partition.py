"""The pipeline partition arithmetic (compiler/partition.py), which the runtime cuts models
with and the compiler's stage shapes use: DeepSpeed's partition_uniform and partition_balanced."""

from __future__ import annotations

import itertools

import pytest

from zeroplan.compiler.partition import layer_weights, partition_balanced, partition_layers, partition_uniform
from zeroplan.schemas import ConfigError


def test_partition_arithmetic():
    assert partition_uniform(7, 3) == [0, 3, 5, 7]
    assert partition_balanced([5, 1, 1, 1, 1, 5], 2) == [0, 3, 6]
    assert partition_balanced([10, 1, 1, 1], 2) == [0, 1, 4]
    assert partition_balanced([0, 1, 1, 0], 2) == [0, 2, 4]
    assert partition_balanced([1, 1, 1, 100], 4) == [0, 1, 2, 3, 4]  # every stage gets a layer
    for weights in ([3, 1, 4, 1, 5, 9, 2, 6], [1] * 9, [0, 0, 7, 0]):
        for parts in range(1, len(weights) + 1):
            b = partition_balanced(weights, parts)
            assert b[0] == 0 and b[-1] == len(weights) and all(x < y for x, y in zip(b, b[1:]))
            heaviest = max(sum(weights[x:y]) for x, y in zip(b, b[1:]))
            assert heaviest == _best_bottleneck(weights, parts)


def _best_bottleneck(weights, parts):
    """Brute force over every cut."""
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), parts - 1):
        b = [0, *cuts, len(weights)]
        worst = max(sum(weights[x:y]) for x, y in zip(b, b[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_weights_per_method():
    names, params = ["Embeddings", "Block", "Block", "Head"], [10, 7, 7, 9]
    assert layer_weights(names=names, params=params, method="parameters") == params
    assert layer_weights(names=names, params=params, method="uniform") == [1, 1, 1, 1]
    assert layer_weights(names=names, params=params, method="type:^block$") == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="matches no layer class"):
        layer_weights(names=names, params=params, method="type:conv")
    with pytest.raises(ConfigError, match=r"pp\(5\) > layers\(4\)"):
        partition_layers(names=names, params=params, stages=5, method="uniform")
