"""Pipeline partition: which consecutive layers each of pp stages runs. One torch-free
definition, DeepSpeed's `PipelineModule` semantics (its `partition_method`): the runtime cuts a
model's pipeline layers with `partition_layers` (runtime/parallel/pipeline.py passes each
layer's class name and trainable parameter count), and the compiler's stage shapes
(shapes.py) make the same call on the layer sequence the built-in GPT hands the runtime.

Methods:
- `parameters` (the default): balance the trainable parameter counts of the stages;
- `uniform`: balance the number of layers (the first stages take one more when it does not divide);
- `type:<regex>`: balance the layers whose class name matches the regex (case-insensitive).
Balancing minimises the heaviest stage (DeepSpeed's `partition_balanced`, as a binary search
on the bottleneck); every stage gets at least one layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.parallel import parse_partition_method


def partition_uniform(items: int, parts: int) -> list[int]:
    """Boundaries [0, ..., items] of `parts` runs whose sizes differ by at most one (first runs larger)."""
    base, extra = divmod(items, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def partition_balanced(weights: Sequence[int], parts: int) -> list[int]:
    """Boundaries of `parts` non-empty runs of consecutive items minimising the heaviest run."""
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    lo, hi = max(weights), prefix[-1]
    while lo < hi:  # the smallest feasible bottleneck
        mid = (lo + hi) // 2
        if _probe(prefix, parts, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return _probe(prefix, parts, lo)


def _probe(prefix: list[int], parts: int, bottleneck: int) -> list[int] | None:
    """Greedy boundaries with every run <= bottleneck and non-empty, or None if impossible."""
    n, bounds, start = len(prefix) - 1, [0], 0
    for j in range(parts):
        end = start + 1
        if prefix[end] - prefix[start] > bottleneck:
            return None
        last_end = n - (parts - j - 1)  # leave one item for every later run
        while end < last_end and prefix[end + 1] - prefix[start] <= bottleneck:
            end += 1
        bounds.append(end)
        start = end
    return bounds if start == n else None


def layer_weights(*, names: Sequence[str], params: Sequence[int], method: str) -> list[int]:
    """What `method` balances, per layer, given each layer's class name and trainable
    parameter count; ValueError when a `type:` regex matches no class (DeepSpeed's too)."""
    kind, regex = parse_partition_method(method)
    if kind == "uniform":
        return [1] * len(names)
    if kind == "parameters":
        return list(params)
    weights = [1 if regex.search(name) else 0 for name in names]
    if not any(weights):
        raise ValueError(f"partition_method {method!r} matches no layer class (the layers are "
                         f"{', '.join(sorted(set(names)))})")
    return weights


def partition_layers(*, names: Sequence[str], params: Sequence[int], stages: int, method: str) -> list[int]:
    """Stage boundaries [0, ..., len(names)]: stage s runs layers [b[s], b[s + 1])."""
    if stages > len(names):
        raise ConfigError(Problem("parallel.pp", f"pp({stages}) > layers({len(names)}) of the model's pipeline "
                                  "sequence: every pipeline stage needs at least one layer", given=stages,
                                  suggestion=f"compile the plan with parallel.pp at most {len(names)}"))
    if parse_partition_method(method)[0] == "uniform":
        return partition_uniform(len(names), stages)
    return partition_balanced(layer_weights(names=names, params=params, method=method), stages)
