"""The styles of a tensor-parallel plan: zeroplan's, and Hugging Face's translated to them.

A plan maps module-name patterns to a style, written as a name or as one of the dataclasses
below. Every accepted name is in STYLES, once: zeroplan's own ('colwise', 'rowwise', 'vocab',
'positions', 'replicate') and those of Hugging Face's `tp_plan`s (transformers'
`ALL_PARALLEL_STYLES`, distributed/tensor_parallel.py), each translated to the layer that
computes the same thing, so a model's own `model.tp_plan` is a zeroplan plan as it is:

    'colwise'                                    Colwise(): output features split, output stays split
    'colwise_rep', 'colwise_gather_output'       Colwise(gather_output=True): output all-gathered
                                                 (an LM head: the model's own loss sees whole logits)
    'packed_colwise'                             Colwise(fused=2): a fused [gate | up] Linear, each block
                                                 split alike (HF's _StridedShard with split_factor 2)
    'rowwise'                                    Rowwise(): input already split, output all-reduced
    'rowwise_rep', 'rowwise_split_input'         Rowwise(input_is_parallel=False): a replicated input
                                                 is split first
    'embedding_rowwise'                          Vocab(): the embedding's rows split by vocabulary
    'replicate'                                  Replicate(): left whole on every tp rank
    'replicated_with_grad_allreduce'             Replicate(sum_grad=True): left whole, its gradients
                                                 summed over tp (a per-head norm such as Qwen3's
                                                 q_norm sees only this rank's heads)

The Hugging Face styles in REFUSED need what zeroplan's layers do not do (communication left
to the model's code, sequence or expert parallelism, bare parameters); each is a ConfigError
naming the pattern, the style and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from zeroplan.schemas import ConfigError, Problem


@dataclass(frozen=True)
class Colwise:
    """Split a Linear's output features; `fused` equal blocks ([q|k|v]: 3) are split alike."""

    fused: int = 1
    gather_output: bool = False


@dataclass(frozen=True)
class Rowwise:
    """Split a Linear's input features; the input is already split unless `input_is_parallel` is False."""

    input_is_parallel: bool = True


@dataclass(frozen=True)
class Vocab:
    """Split by vocabulary: an embedding's rows, an LM head's outputs, a cross-entropy's classes."""


@dataclass(frozen=True)
class Positions:
    """Learned position embeddings (replicated) looked up for this rank's part of the sequence:
    sequence parallelism only."""


@dataclass(frozen=True)
class Replicate:
    """Leave the module whole on every tp rank. `sum_grad`: its parameters' gradients are summed
    over tp, for a module that sees only this rank's part of a split activation (a norm over
    head_dim applied to this rank's heads), so each rank's gradient is a partial sum."""

    sum_grad: bool = False


Style = Union[Colwise, Rowwise, Vocab, Positions, Replicate]

STYLES: dict[str, Style] = {
    "colwise": Colwise(), "rowwise": Rowwise(), "vocab": Vocab(), "positions": Positions(), "replicate": Replicate(),
    "colwise_rep": Colwise(gather_output=True), "colwise_gather_output": Colwise(gather_output=True),
    "packed_colwise": Colwise(fused=2),
    "rowwise_rep": Rowwise(input_is_parallel=False), "rowwise_split_input": Rowwise(input_is_parallel=False),
    "embedding_rowwise": Vocab(), "replicated_with_grad_allreduce": Replicate(sum_grad=True),
}
"""Every style name a plan may use; the module docstring says where each comes from."""

_LOCAL = ("splits the weights as colwise/rowwise do but leaves the communication to the model's own code or "
          "to a 'gather' / 'local' entry on an enclosing module, while zeroplan's layers communicate themselves, "
          "so the entry cannot be translated on its own",
          "pass initialize(..., tp_plan=...) with 'colwise' / 'rowwise' / 'colwise_gather_output' for these modules "
          "and no 'gather' / 'local' entries")
_EXPERTS = ("it belongs to mixture-of-experts parallelism, which zeroplan does not implement",
            "remove the experts' entries (they then run whole on every tp rank) or compile with parallel.tp 1")

REFUSED: dict[str, tuple[str, str]] = {
    "local_colwise": _LOCAL, "local_rowwise": _LOCAL, "local_packed_rowwise": _LOCAL, "local": _LOCAL,
    "gather": ("it all-gathers the output that 'local_*' layers left split; zeroplan's column-parallel layer "
               "gathers its own output", "use 'colwise_gather_output' on the layer itself, and 'colwise' / 'rowwise' "
               "instead of the 'local_*' styles"),
    "sequence_parallel": ("it splits the activations between tensor-parallel regions along the sequence; "
                          "zeroplan's sequence parallelism (parallel.sequence_parallel) is laid out for the built-in "
                          "GPT only", "remove the entry: the module then runs on the whole sequence on every tp "
                          "rank, as without sequence parallelism"),
    "embedding_colwise": ("it splits an embedding's hidden dimension; zeroplan splits embeddings by vocabulary",
                          "use 'embedding_rowwise' for this embedding"),
    "packed_rowwise": ("it splits fused blocks along a weight's input dimension (packed expert weights); zeroplan's "
                       "row-parallel layer has no fused blocks", "remove the entry"),
    "local_params": ("it shards a module's bare parameters (attention sinks); zeroplan splits Linear, Conv1D and "
                     "Embedding modules", "remove the entry and the bare parameters' entries"),
    "mla_kv_a_proj": ("multi-head latent attention's mixed split/replicated projection is not implemented",
                      "compile with parallel.tp 1"),
    "all_reduce": ("it sums a module's partial outputs left by expert or 'local_*' layers", _EXPERTS[1]),
    "moe_tp_experts": _EXPERTS, "moe_identity_expert": _EXPERTS, "ep_router": _EXPERTS,
    "grouped_gemm": _EXPERTS, "ep_dispatch_experts": _EXPERTS,
}
"""Hugging Face styles zeroplan refuses: style -> (why, what to do)."""


def plan_problem(pattern: str, message: str, given=None, suggestion: str | None = None) -> ConfigError:
    """The ConfigError of one plan entry, keyed by its pattern."""
    return ConfigError(Problem(f"tp_plan[{pattern!r}]", message, given=given, suggestion=suggestion))


def resolve_style(pattern: str, style) -> Style:
    """The Style a plan entry names; a refused or unknown name is a ConfigError naming the pattern."""
    if isinstance(style, (Colwise, Rowwise, Vocab, Positions, Replicate)):
        return style
    if isinstance(style, str) and style in STYLES:
        return STYLES[style]
    if isinstance(style, str) and style in REFUSED:
        why, suggestion = REFUSED[style]
        raise plan_problem(pattern, f"Hugging Face's tensor-parallel style {style!r} is not supported: {why}",
                           given=style, suggestion=suggestion)
    raise plan_problem(pattern, "unknown tensor-parallel style", given=style,
                       suggestion=f"use one of {sorted(STYLES)}, Colwise(...), Rowwise(...) or Replicate(...)")
