"""Applying tensor parallelism to a model from a plan of module-name patterns.

    apply_tensor_parallel(model, plan={"blocks.*.fc": "colwise", "blocks.*.out": "rowwise"}, coll=tp)

Each pattern (fnmatch: `*` matches any run of characters, dots included) names modules to
replace by their parallel version; the style says how:

    "colwise" / Colwise(fused=1, gather_output=False)   nn.Linear -> ColumnParallelLinear
    "rowwise" / Rowwise(input_is_parallel=True)          nn.Linear -> RowParallelLinear
    "vocab"                                              nn.Embedding -> VocabParallelEmbedding,
        nn.Linear (an LM head) -> ColumnParallelLinear over the vocabulary (logits stay split),
        nn.CrossEntropyLoss -> VocabParallelCrossEntropy (takes the split logits)
    "replicate" / Replicate(sum_grad=False)              any module, left whole

transformers' Conv1D (GPT-2's layers, weight [in, out]) is split like nn.Linear. Hugging
Face's own style names ('colwise_gather_output', 'embedding_rowwise', ...) are accepted too:
tensor_styles.py translates them, and hf_plan.py reads a Hugging Face model's own plan. After
the split, attention modules hold this rank's head counts (tensor_heads.py).

Initialisation stays reproducible and equal to single-process training: every rank builds
the full model (same seed), `sync_tp_replicas` makes the tp group's copies equal to its first
rank's, and each rank keeps its slice of the initialised weights. Parameters tied to one
another (an LM head tied to the embedding) stay tied when both are split the same way.

Dropout: the built-in GPT has none. A model with dropout keeps it reproducible as Megatron's
model-parallel RNG does: replicated regions (after a row-parallel all-reduce) draw from the
default generator, seeded alike on every tp rank (the data-parallel seed), and regions whose
activations are split (inside attention, between fc and out) from a second generator seeded
with seed + 2718 + tp_rank, so masks differ between the slices yet repeat run to run. No
tracker is provided here; with the built-in model nothing draws random numbers in forward.

The built-in GPT's plan (`GPT_PLAN`) splits attention by heads (the fused [q|k|v] weight is
cut block by block, so each rank keeps whole heads of q, k and v), the MLP in two, and the
vocabulary of the tied embedding / LM head and the loss. With tp > 1 its forward without
labels returns this rank's vocabulary slice of the logits (Megatron's parallel_output).

`sequence_parallel=True` (the plan's parallel.sequence_parallel; sequence.py) builds every
layer in its sequence-parallel form, and the "positions" style looks the learned positions up
for this rank's part of the sequence: GPT_SEQUENCE_PARALLEL_PLAN. It is the built-in GPT's
only: `default_plan` refuses it for any other model.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping

import torch
from torch import nn

from zeroplan.schemas import ConfigError, Problem

from ..comm import Collectives
from .hf_plan import hf_default_plan, is_hf_model, linear_dims
from .sequence import SequenceParallelPositions
from .tensor import (ColumnParallelLinear, RowParallelLinear, TpSplit, VocabParallelCrossEntropy,
                     VocabParallelEmbedding, shard_parameter)
from .tensor_comm import piece, split_sizes, sum_gradients_over_tp
from .tensor_heads import localize_heads
from .tensor_styles import (Colwise, Positions, Replicate, Rowwise, Style, Vocab, plan_problem as _problem,
                            resolve_style)

GPT_PLAN: dict[str, str | Style] = {
    "wte": "vocab",
    "blocks.*.attn.qkv": Colwise(fused=3),
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.fc": "colwise",
    "blocks.*.out": "rowwise",
    "lm_head": "vocab",
    "loss": "vocab",
}
"""The built-in GPT's plan (runtime/models/gpt.py)."""

GPT_SEQUENCE_PARALLEL_PLAN: dict[str, str | Style] = {**GPT_PLAN, "wpe": "positions"}
"""The built-in GPT's plan with sequence parallelism (applied with sequence_parallel=True)."""


def default_plan(model: nn.Module, *, tp: int, sequence_parallel: bool = False) -> dict | None:
    """The plan a model brings: GPT_PLAN (GPT_SEQUENCE_PARALLEL_PLAN) for the built-in GPT, a
    Hugging Face model's own (hf_plan.py), else a `tp_plan` attribute, else None. Sequence
    parallelism for another model is a ConfigError."""
    from ..models.gpt import GPT

    if isinstance(model, GPT):
        heads = model.spec.heads
        if heads % tp:
            raise ConfigError(Problem("parallel.tp", f"tp({tp}) does not divide heads({heads}) of model "
                                      f"{model.spec.name}", given=tp,
                                      suggestion=f"compile the plan with parallel.tp a divisor of {heads}"))
        return dict(GPT_SEQUENCE_PARALLEL_PLAN if sequence_parallel else GPT_PLAN)
    if sequence_parallel:
        raise ConfigError(Problem("parallel.sequence_parallel", f"sequence parallelism is implemented for the "
                                  f"built-in GPT only, not {type(model).__name__}: a parameter a model of one's own "
                                  "keeps whole on every tp rank may see the whole sequence, and summing its "
                                  "gradient over tp would count it tp times", given=True,
                                  suggestion="compile the plan with parallel.sequence_parallel false"))
    if is_hf_model(model):
        return hf_default_plan(model)
    plan = getattr(model, "tp_plan", None)
    return dict(plan) if plan is not None else None


def sync_tp_replicas(model: nn.Module, coll: Collectives) -> None:
    """Make every tp rank's full model equal to the first tp rank's (before slicing)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            coll.broadcast(t.data, src=0)


def apply_tensor_parallel(model: nn.Module, *, plan: Mapping[str, str | Style], coll: Collectives,
                          strict: bool = True, sequence_parallel: bool = False) -> nn.Module:
    """Replace the modules `plan` names with their tensor-parallel versions over `coll`'s group,
    each keeping this rank's slice of the module's current (initialised) weights. In place;
    returns `model`. `strict`: a pattern that matches no module is an error (a typo); pass
    False when the model is one pipeline stage holding part of the modules.
    `sequence_parallel`: every layer in its sequence-parallel form (sequence.py).
    """
    styles = {pattern: resolve_style(pattern, s) for pattern, s in plan.items()}
    targets = _match(model, styles)
    if strict:
        unused = sorted(set(styles) - {p for p, _ in targets.values()})
        if unused:
            raise _problem(unused[0], "the pattern matches no module of the model",
                           suggestion="patterns are fnmatch over qualified names from model.named_modules(), "
                           "e.g. 'blocks.*.fc'" + _prefix_hint(model))
    vocab = _vocab_size(model, targets)
    tied: dict[int, tuple[TpSplit, nn.Parameter]] = {}
    split = []
    for name, (pattern, style) in targets.items():
        module = model.get_submodule(name)
        new = _convert(module, style, pattern=pattern, name=name, coll=coll, vocab=vocab, tied=tied,
                       sequence_parallel=sequence_parallel)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        if isinstance(new, ColumnParallelLinear) and not new.gather_output:
            split.append(name)
    localize_heads(model, split=split, tp=coll.size)
    return model


def _prefix_hint(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", None) if is_hf_model(model) else None
    return (f"; a Hugging Face base_model_tp_plan's names lie under base_model_prefix ('{prefix}.layers.*...')"
            if prefix else "")


def _match(model: nn.Module, styles: dict[str, Style]) -> dict[str, tuple[str, Style]]:
    out = {}
    for name, _ in model.named_modules():
        hits = [p for p in styles if name and fnmatch.fnmatchcase(name, p)]
        if len(hits) > 1:
            raise _problem(hits[1], f"module {name!r} matches more than one pattern: {hits}",
                           suggestion="make the patterns disjoint")
        if hits:
            out[name] = (hits[0], styles[hits[0]])
    return out


def _vocab_size(model: nn.Module, targets: dict[str, tuple[str, Style]]) -> int | None:
    """The vocabulary a 'vocab' cross-entropy splits: that of the plan's vocab embedding / head."""
    sizes = set()
    for name, (_, style) in targets.items():
        module = model.get_submodule(name)
        if isinstance(style, Vocab) and isinstance(module, nn.Embedding):
            sizes.add(module.num_embeddings)
        elif isinstance(style, Vocab) and isinstance(module, nn.Linear):
            sizes.add(module.out_features)
    if len(sizes) > 1:
        raise ConfigError(Problem("tp_plan", f"the 'vocab' modules disagree on the vocabulary size: {sorted(sizes)}",
                                  suggestion="split by vocabulary only the embedding, LM head and loss of one vocabulary"))
    return sizes.pop() if sizes else None


def _convert(module: nn.Module, style: Style, *, pattern: str, name: str, coll: Collectives,
             vocab: int | None, tied: dict, sequence_parallel: bool) -> nn.Module:
    kind = type(module).__name__
    if isinstance(style, Replicate):
        if style.sum_grad:
            sum_gradients_over_tp(module.parameters(), coll)
        return module
    if isinstance(style, Positions):
        return _positions(module, pattern=pattern, name=name, coll=coll, sequence_parallel=sequence_parallel)
    if isinstance(style, Vocab) and isinstance(module, nn.CrossEntropyLoss):
        return _vocab_loss(module, pattern=pattern, coll=coll, vocab=vocab)
    if isinstance(style, Vocab) and isinstance(module, nn.Embedding):
        return _vocab_embedding(module, pattern=pattern, name=name, coll=coll, tied=tied,
                                sequence_parallel=sequence_parallel)
    linear = isinstance(module, nn.Linear) or (not isinstance(style, Vocab) and linear_dims(module) is not None)
    if not linear:
        raise _problem(pattern, f"module {name!r} is a {kind}; style {style} applies to "
                       + ("nn.Linear, nn.Embedding and nn.CrossEntropyLoss" if isinstance(style, Vocab)
                          else "nn.Linear and transformers' Conv1D"),
                       suggestion="remove the pattern or narrow it to the Linear layers")
    if isinstance(style, Rowwise):
        return _rowwise(module, style, pattern=pattern, name=name, coll=coll, tied=tied,
                        sequence_parallel=sequence_parallel)
    return _colwise(module, style if isinstance(style, Colwise) else Colwise(), pattern=pattern, name=name,
                    coll=coll, tied=tied, sequence_parallel=sequence_parallel)


def _colwise(module: nn.Module, style: Colwise, *, pattern: str, name: str, coll: Collectives,
             tied: dict, sequence_parallel: bool) -> ColumnParallelLinear:
    """Output features split: dim 0 of a Linear's weight [out, in], dim 1 of a Conv1D's [in, out]."""
    _, out_features, transposed = linear_dims(module)
    fused = style.fused
    if out_features % fused:
        raise _problem(pattern, f"{name!r} has {out_features} output features, not {fused} equal blocks",
                       given=fused)
    if style.gather_output and fused > 1:
        raise _problem(pattern, "gather_output with fused blocks would interleave the blocks' slices",
                       suggestion="use Colwise(fused=..., gather_output=False)")
    sizes = split_sizes(out_features // fused, coll.size)
    if min(sizes) == 0:
        raise _problem(pattern, f"{name!r}: {out_features // fused} output features cannot be split "
                       f"over tp({coll.size})", suggestion="use a smaller parallel.tp")
    split = TpSplit(dim=1 if transposed else 0, sizes=sizes, fused=fused)
    weight = _shared(module.weight, split, coll, tied, pattern=pattern, name=name)
    bias = None if module.bias is None else _shared(module.bias, TpSplit(dim=0, sizes=sizes, fused=fused), coll,
                                                    tied, pattern=pattern, name=name)
    return ColumnParallelLinear(weight=weight, bias=bias, coll=coll, out_sizes=sizes, gather_output=style.gather_output,
                                sequence_parallel=sequence_parallel, transposed=transposed)


def _rowwise(module: nn.Module, style: Rowwise, *, pattern: str, name: str, coll: Collectives,
             tied: dict, sequence_parallel: bool) -> RowParallelLinear:
    """Input features split: dim 1 of a Linear's weight [out, in], dim 0 of a Conv1D's [in, out]."""
    in_features, _, transposed = linear_dims(module)
    sizes = split_sizes(in_features, coll.size)
    if min(sizes) == 0:
        raise _problem(pattern, f"{name!r}: {in_features} input features cannot be split over "
                       f"tp({coll.size})", suggestion="use a smaller parallel.tp")
    weight = _shared(module.weight, TpSplit(dim=0 if transposed else 1, sizes=sizes), coll, tied, pattern=pattern,
                     name=name)
    bias = None if module.bias is None else _shared(module.bias, None, coll, tied, pattern=pattern, name=name)
    return RowParallelLinear(weight=weight, bias=bias, coll=coll, in_sizes=sizes,
                             input_is_parallel=style.input_is_parallel, sequence_parallel=sequence_parallel,
                             transposed=transposed)


def _vocab_embedding(module: nn.Embedding, *, pattern: str, name: str, coll: Collectives,
                     tied: dict, sequence_parallel: bool) -> VocabParallelEmbedding:
    if module.max_norm is not None or module.sparse:
        raise _problem(pattern, f"{name!r}: a vocab-parallel embedding supports no max_norm or sparse gradients",
                       suggestion="remove the pattern, or those options")
    sizes = split_sizes(module.num_embeddings, coll.size)
    weight = _shared(module.weight, TpSplit(dim=0, sizes=sizes), coll, tied, pattern=pattern, name=name)
    return VocabParallelEmbedding(weight=weight, coll=coll, vocab_start=piece(sizes, coll.rank)[0],
                                  sequence_parallel=sequence_parallel, padding_idx=module.padding_idx)


def _positions(module: nn.Module, *, pattern: str, name: str, coll: Collectives,
               sequence_parallel: bool) -> SequenceParallelPositions:
    if not sequence_parallel:
        raise _problem(pattern, "the 'positions' style splits the sequence: it needs parallel.sequence_parallel",
                       suggestion="remove the pattern, or compile with parallel.sequence_parallel true")
    if not isinstance(module, nn.Embedding) or module.padding_idx is not None or module.max_norm is not None:
        raise _problem(pattern, f"module {name!r} is a {type(module).__name__}; 'positions' applies to a plain "
                       "nn.Embedding of positions", suggestion="remove the pattern")
    return SequenceParallelPositions(weight=module.weight, coll=coll)


def _vocab_loss(module: nn.CrossEntropyLoss, *, pattern: str, coll: Collectives,
                vocab: int | None) -> VocabParallelCrossEntropy:
    if vocab is None:
        raise _problem(pattern, "a 'vocab' cross-entropy needs the plan to split an embedding or LM head "
                       "by vocabulary too (its logits must be split)", suggestion="add the LM head as 'vocab'")
    if module.weight is not None or module.label_smoothing:
        raise _problem(pattern, "the vocab-parallel cross-entropy supports no class weights or label smoothing")
    start = piece(split_sizes(vocab, coll.size), coll.rank)[0]
    return VocabParallelCrossEntropy(coll=coll, vocab_start=start, ignore_index=module.ignore_index,
                                     reduction=module.reduction)


def _shared(param: nn.Parameter, split: TpSplit | None, coll: Collectives, tied: dict, *, pattern: str,
            name: str) -> nn.Parameter:
    """This rank's slice of `param`; the same new parameter for every module tied to it."""
    if id(param) in tied:
        seen, new = tied[id(param)]
        if seen != split:
            raise _problem(pattern, f"{name!r} shares a parameter with a module split another way "
                           f"({seen} vs {split})", suggestion="split tied modules alike")
        return new
    new = shard_parameter(param, split, coll)
    tied[id(param)] = (split, new)
    return new
