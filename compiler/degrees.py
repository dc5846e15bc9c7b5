"""The dp/tp/pp degrees for a world, and every reason they cannot work with a model: the one
degree rule, which compile checks, and the cost-model search (search.py) and the tuner's
search space (autotune/space.py) enumerate through `degree_choices`.

Messages echo the numbers, say which were given and which derived, and name the key or
option to change (`parallel.tp`, `--nproc-per-node`), as torchtitan's `ParallelDims` does.
"""

from __future__ import annotations

from zeroplan.schemas import ModelSpec, Problem, TrainConfig, derive_degrees

_WORLD_HINT = "--nproc-per-node (or --nnodes)"


def _world_text(world_size: int, nnodes: int, nproc: int) -> str:
    return f"world_size({world_size}) = nnodes({nnodes}) x nproc_per_node({nproc})"


def resolve_degrees(config: TrainConfig, *, nnodes: int, nproc_per_node: int) -> tuple[int, int, int]:
    """(dp, tp, pp) for the launch's world (schemas' `derive_degrees`, in the launch's words)."""
    world = nnodes * nproc_per_node
    return derive_degrees(config.parallel, config.tensor_parallel.autotp_size, world_size=world,
                          world=_world_text(world, nnodes, nproc_per_node), world_hint=_WORLD_HINT)


def degree_problems(*, dp: int, tp: int, pp: int, stage: int, model: ModelSpec,
                    tp_key: str = "parallel.tp") -> list[Problem]:
    """Why these degrees cannot split this model (empty when they can)."""
    problems = []
    name = model.name
    divisible = [("heads", model.heads), ("hidden", model.hidden), ("ffn", model.ffn)]
    if model.kv_heads is not None:
        divisible.insert(1, ("kv_heads", model.kv_heads))
    for what, n in divisible:
        if n % tp:
            problems.append(Problem(tp_key, f"tp({tp}) does not divide {what}({n}) of model {name}",
                                    given=tp, suggestion=f"change {tp_key} to a divisor of {n}"))
    if pp > model.layers:
        problems.append(Problem("parallel.pp", f"pp({pp}) > layers({model.layers}) of model {name}: "
                                "every pipeline stage needs at least one block",
                                given=pp, suggestion=f"change parallel.pp to at most {model.layers}"))
    if stage == 3 and pp > 1:
        problems.append(Problem("zero_optimization.stage", f"ZeRO stage 3 with pp({pp}) > 1 is not supported: "
                                "stage 3 gathers parameters per module while pipeline stages own disjoint "
                                "modules", given=3,
                                suggestion="set zero_optimization.stage to 0, 1 or 2, or parallel.pp to 1"))
    return problems


def degree_choices(*, world_size: int, model: ModelSpec, tp_max: int | None = None,
                   pp_max: int | None = None) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) with dp * tp * pp = world_size that can split `model` (no
    `degree_problems` below ZeRO stage 3, whose refusal of pp > 1 is the stage's to choose),
    optionally with tp <= tp_max and pp <= pp_max; by tp, then pp, ascending."""
    out = []
    for tp in range(1, min(world_size, tp_max or world_size) + 1):
        for pp in range(1, min(world_size // tp, pp_max or world_size) + 1):
            if world_size % (tp * pp) == 0 and not degree_problems(dp=world_size // (tp * pp), tp=tp, pp=pp,
                                                                   stage=0, model=model):
                out.append((world_size // (tp * pp), tp, pp))
    return out


def degree_warnings(*, dp: int, tp: int, pp: int, stage: int, nproc_per_node: int, micro_batches: int) -> list[str]:
    """Degrees that work but are probably unintended."""
    notes = []
    if tp > nproc_per_node:
        notes.append(f"tp({tp}) > nproc_per_node({nproc_per_node}): tensor-parallel all-reduces cross nodes "
                     "on every block; keep parallel.tp within a node")
    if pp > 1 and stage == 2:
        notes.append("ZeRO stage 2 with pipeline parallelism: DeepSpeed's PipelineEngine refuses it, so "
                     "ds_config.json runs only under zeroplan's runtime")
    if pp > 1 and micro_batches < pp:
        notes.append(f"pipeline micro-batches({micro_batches}) < pp({pp}): stages idle most of the step; "
                     "raise gradient_accumulation_steps to at least pp")
    if dp == 1 and stage > 0:
        notes.append(f"ZeRO stage {stage} with dp(1) shards nothing; stage 0 is equivalent and cheaper")
    return notes
