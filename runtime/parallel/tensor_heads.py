"""Attention modules keep this rank's head counts once their projections are split by heads.

An attention module reshapes its projections' outputs with sizes it computed from the whole
model's config. Llama's `view(*input_shape, -1, head_dim)` needs only head_dim, which the
split keeps; GPT-2 cuts its fused [q|k|v] output with `split_size` (the whole hidden width)
and other modules view with `num_heads`. With q, k and v column-split each rank holds
heads / tp of them, so on every module that has a `head_dim` and whose column-parallel
children keep their output split, the attributes in HEAD_ATTRIBUTES (counts of heads, or
widths of heads x head_dim) become this rank's, as Megatron-LM's attention keeps
`num_attention_heads_per_partition`. The config object, shared by every layer, is left alone.

Each rank must hold whole heads: a split that cuts a head is a ConfigError naming parallel.tp.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from zeroplan.schemas import ConfigError, Problem

HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "split_size", "embed_dim",
                   "all_head_size")
"""An attention module's attributes that count its heads, or its heads' total width."""


def localize_heads(model: nn.Module, *, split: Iterable[str], tp: int) -> None:
    """Set the head attributes of the parents of `split` (names of column-parallel layers whose
    output stays split) that have a `head_dim` to this rank's share; in place."""
    parents: dict[str, nn.Module] = {}
    for name in split:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        head_dim = getattr(parent, "head_dim", None)
        if not isinstance(head_dim, int) or isinstance(head_dim, bool):
            continue
        sizes = model.get_submodule(name).out_sizes
        if any(n % head_dim for n in sizes):
            raise _not_whole(f"tp({tp}) splits {name!r} into {list(sizes)} output features per rank, which are not "
                             f"whole heads of head_dim {head_dim}", tp=tp, heads=sum(sizes) // head_dim)
        parents[parent_name] = parent
    for parent_name, parent in parents.items():
        for attribute in HEAD_ATTRIBUTES:
            value = getattr(parent, attribute, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value % tp:
                raise _not_whole(f"tp({tp}) does not divide {parent_name}.{attribute} ({value})", tp=tp, heads=value)
            setattr(parent, attribute, value // tp)


def _not_whole(message: str, *, tp: int, heads: int) -> ConfigError:
    return ConfigError(Problem("parallel.tp", message, given=tp,
                               suggestion=f"compile the plan with parallel.tp a divisor of the attention heads "
                               f"({heads}) and of the key-value heads"))
