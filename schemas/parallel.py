"""`parallel` block (zeroplan's dp/tp/pp degrees) and DeepSpeed's `tensor_parallel`.

The product of the three degrees is the world size. A degree left out is derived: dp from
the world size once tp and pp are known, tp and pp default to 1. "auto" hands the choice to
compile (cost model) or autotune (measurement).
"""

import re
from typing import Annotated

from pydantic import PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from .errors import ConfigError, Problem
from .layout import DIMS, order_problem
from .types import AutoPositive, Flag, Positive, StrictModel, choice, is_auto

PARTITION_METHODS = ("parameters", "uniform", "type:<regex>")


def parse_partition_method(method: str) -> tuple[str, re.Pattern | None]:
    """('parameters' | 'uniform' | 'type', the compiled case-insensitive regex or None), as
    DeepSpeed's PipelineModule reads `partition_method`; ValueError for anything else."""
    if method in ("parameters", "uniform"):
        return method, None
    if method.startswith("type:") and method[5:]:
        try:
            return "type", re.compile(method[5:], re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"partition_method {method!r}: bad regex ({e})") from e
    raise ValueError(f"partition_method {method!r} is none of {', '.join(PARTITION_METHODS)}")


def _partition_method(value: object) -> str:
    if isinstance(value, str):
        try:
            parse_partition_method(value)
            return value
        except ValueError as e:
            raise PydanticCustomError("value_error", "{reason}", {"reason": str(e)}) from e
    raise PydanticCustomError("type", "expected 'parameters', 'uniform' or 'type:<regex>'")


PartitionMethod = Annotated[str, PlainValidator(_partition_method),
                            WithJsonSchema({"type": "string", "pattern": "^(parameters|uniform|type:.+)$"})]


def _layout(value: object) -> list[str]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        problem = order_problem(tuple(value))
        if problem is None:
            return list(value)
        raise PydanticCustomError("value_error", "{reason}", {"reason": problem})
    raise PydanticCustomError("type", "expected a list naming pp, dp and tp, slowest-varying first")


Layout = Annotated[list[str], PlainValidator(_layout),
                   WithJsonSchema({"type": "array", "items": {"enum": list(DIMS)}, "minItems": 3, "maxItems": 3,
                                   "uniqueItems": True})]


class PipelineConfig(StrictModel):
    schedule: choice("1f1b", "gpipe", "interleaved") = "1f1b"
    """Pipeline schedule: 1F1B (less activation memory), GPipe (all forwards, then all backwards),
    or interleaved 1F1B over `virtual_stages` model chunks per stage (Narayanan et al. 2021,
    section 2.2.2: a bubble 1/virtual_stages of 1F1B's for as many more point-to-point messages).
    zeroplan compiles and estimates an interleaved plan; its runtime does not run one yet and
    refuses the plan at initialize."""
    virtual_stages: Positive = 1
    """Model chunks per pipeline stage, the interleaved schedule's v (Megatron-LM's virtual pipeline
    stages: `--num-layers-per-virtual-pipeline-stage` = layers / (pp * v)); at least 2 with
    schedule 'interleaved', 1 otherwise. Its micro-batch count must be a multiple of pp."""
    partition_method: PartitionMethod = "parameters"
    """How layers are cut into stages (DeepSpeed's PipelineModule `partition_method`): 'parameters'
    balances trainable parameter counts, 'uniform' layer counts, 'type:<regex>' the layers whose
    class name matches the regex (case-insensitive), e.g. 'type:Block'."""
    micro_batches: AutoPositive | None = None
    """Micro-batches per step through the pipeline; None means the gradient-accumulation count."""


class ParallelConfig(StrictModel):
    dp: AutoPositive | None = None
    """Data-parallel degree; None derives world_size / (tp * pp)."""
    tp: AutoPositive | None = None
    """Tensor-parallel degree; None means 1 (or tensor_parallel.autotp_size when given)."""
    pp: AutoPositive | None = None
    """Pipeline-parallel degree; None means 1."""
    sequence_parallel: Flag = False
    """zeroplan's (Megatron-LM's `--sequence-parallel`; Korthikanti et al. 2022, section 4.2.2):
    within the tp group, the norms and the residual stream between blocks hold 1/tp of the
    sequence, and each tp all-reduce becomes an all-gather and a reduce-scatter. Needs the
    model's seq_len divisible by tp, and the built-in GPT (its layout is what is split). No
    effect at tp 1, as in Megatron. Not DeepSpeed-Ulysses (DeepSpeed's `sequence_parallel_size`)."""
    pipeline: PipelineConfig = PipelineConfig()
    """zeroplan's pipeline-parallel settings, read when pp > 1."""
    layout: Layout | None = None
    """zeroplan's rank layout: pp, dp and tp, slowest-varying first; ranks are numbered row-major
    over them and node n holds ranks n * nproc_per_node onwards. None means ["pp", "dp", "tp"]
    (Megatron-LM's): tp groups are consecutive ranks, inside a node whenever tp divides
    nproc_per_node, and pipeline stages are the first to sit on separate nodes. An order that
    splits tp groups across nodes where the default would not is refused."""


class TensorParallelConfig(StrictModel):
    """DeepSpeed's AutoTP block; `autotp_size` is read as zeroplan's `parallel.tp`."""

    autotp_size: AutoPositive | None = None
    """Tensor-parallel degree (DeepSpeed AutoTP)."""


def derive_degrees(parallel: ParallelConfig, tp_alias, *, world_size: int, world: str | None = None,
                   world_hint: str = "the process count") -> tuple[int, int, int]:
    """(dp, tp, pp) for `world_size`, or ConfigError echoing the numbers: the one degree rule,
    used by config validation (a known world size) and by compile (nnodes x nproc_per_node).

    `tp_alias` is DeepSpeed's tensor_parallel.autotp_size (used when parallel.tp is not given).
    A degree left out is derived: tp and pp default to 1, dp is world_size / (tp * pp). "auto"
    degrees are refused (compile or autotune decides them). `world` describes where the world
    size came from, `world_hint` what changes it; both end up in the messages.
    """
    given_tp = parallel.tp if parallel.tp is not None else tp_alias
    tp_key = "parallel.tp" if parallel.tp is not None or tp_alias is None else "tensor_parallel.autotp_size"
    values = {"parallel.dp": parallel.dp, tp_key: given_tp, "parallel.pp": parallel.pp}
    auto = [k for k, v in values.items() if is_auto(v)]
    if auto:
        raise ConfigError(Problem(auto[0], "is 'auto': it is decided by compile or autotune",
                                  suggestion="give a number to check the batch for a world size"))
    world = world or f"world_size({world_size})"
    tp, pp, dp = given_tp or 1, parallel.pp or 1, parallel.dp
    if dp is None:
        if world_size % (tp * pp):
            raise ConfigError(Problem(tp_key if tp > 1 else "parallel.pp",
                                      f"tp({tp}) * pp({pp}) = {tp * pp} does not divide {world}",
                                      suggestion=f"change {tp_key} or parallel.pp, or {world_hint}"))
        dp = world_size // (tp * pp)
    if dp * tp * pp != world_size:  # only a given dp can disagree
        keys = " or ".join(k for k, v in values.items() if v is not None)
        raise ConfigError(Problem("parallel.dp", f"dp({dp}) * tp({tp}) * pp({pp}) = {dp * tp * pp} != "
                                  f"world_size({world_size})", given=dp,
                                  suggestion=f"change {keys} or {world_hint} (or leave dp out to derive it)"))
    return dp, tp, pp
