"""A Hugging Face model's own tensor-parallel plan, and transformers' Conv1D layer.

transformers declares a model's plan in two parts: the config's `base_model_tp_plan` (names
relative to the base model, e.g. "layers.*.self_attn.q_proj") and the model class's `_tp_plan`
for what lies outside it (LlamaForCausalLM's {"lm_head": "colwise_gather_output"}). A model
instance's `tp_plan` property holds both, the base part under `base_model_prefix` ("model."),
plus transformers' vocabulary split of `embed_tokens`; where a version has no such property,
the two parts are joined here the same way. Its style names are translated by
tensor_styles.STYLES. Entries that name no module of this model are left out, as transformers
skips them (a family's plan may name modules a configuration lacks); an entry that names a
bare parameter is a ConfigError, since zeroplan splits modules.

GPT-2 has no plan in transformers: GPT2_BASE_PLAN is zeroplan's (attention split by heads
through its fused [q|k|v] Conv1D, the MLP in two, the vocabulary of the tied embedding and LM
head, whose output is gathered for the model's own loss).

Conv1D (transformers.pytorch_utils) is a Linear whose weight is stored [in, out]; it is
recognised only when transformers is already imported (a model using it imported it), so
zeroplan's runtime does not import transformers.
"""

from __future__ import annotations

import fnmatch
import sys

from torch import nn

from .tensor_styles import Colwise, Style, plan_problem

GPT2_BASE_PLAN: dict[str, str | Style] = {
    "wte": "embedding_rowwise",
    "h.*.attn.c_attn": Colwise(fused=3),
    "h.*.attn.c_proj": "rowwise",
    "h.*.mlp.c_fc": "colwise",
    "h.*.mlp.c_proj": "rowwise",
}
"""GPT-2's base model (GPT2Model) split as Megatron-LM splits it; applied under 'transformer.'."""

GPT2_HEAD_PLAN: dict[str, str | Style] = {"lm_head": "colwise_gather_output"}
"""GPT2LMHeadModel's head: tied to `wte`, split alike, its logits gathered for the model's loss."""


def is_hf_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (duck-typed: its config and base_model_prefix)."""
    return hasattr(model, "config") and isinstance(getattr(model, "base_model_prefix", None), str)


def hf_default_plan(model: nn.Module) -> dict | None:
    """The plan a Hugging Face model declares (GPT2_BASE_PLAN for GPT-2), restricted to the
    entries that name modules of this model; None when it declares none."""
    plan = _declared(model)
    if not plan and getattr(model.config, "model_type", None) == "gpt2":
        head = GPT2_HEAD_PLAN if isinstance(getattr(model, "lm_head", None), nn.Linear) else {}
        plan = {**head, **_under_prefix(model, GPT2_BASE_PLAN)}
    return _present(model, plan) if plan else None


def _declared(model: nn.Module) -> dict:
    instance = getattr(model, "tp_plan", None)
    if isinstance(instance, dict) and instance:
        return dict(instance)
    head = dict(getattr(type(model), "_tp_plan", None) or {})
    return {**head, **_under_prefix(model, dict(getattr(model.config, "base_model_tp_plan", None) or {}))}


def _under_prefix(model: nn.Module, plan: dict) -> dict:
    """A base-model plan's names from `model`'s root: under `base_model_prefix` unless `model`
    is the base model itself."""
    prefix = model.base_model_prefix
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return dict(plan)
    return {f"{prefix}.{pattern}": style for pattern, style in plan.items()}


def _present(model: nn.Module, plan: dict) -> dict:
    modules = [name for name, _ in model.named_modules() if name]
    params = [name for name, _ in model.named_parameters()]
    kept = {}
    for pattern, style in plan.items():
        if any(fnmatch.fnmatchcase(name, pattern) for name in modules):
            kept[pattern] = style
            continue
        named = [name for name in params if fnmatch.fnmatchcase(name, pattern)]
        if named:
            raise plan_problem(pattern, f"the model's plan names parameter {named[0]!r}, not a module: zeroplan's "
                               "tensor parallelism splits Linear, Conv1D and Embedding modules", given=style,
                               suggestion="pass initialize(..., tp_plan=...) without this entry")
    return kept


def conv1d_type() -> type | None:
    """transformers' Conv1D class if transformers is imported, else None."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) of an nn.Linear or a Conv1D (weight [in, out],
    transposed); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    conv = conv1d_type()
    if conv is not None and isinstance(module, conv):
        in_features, out_features = module.weight.shape
        return in_features, out_features, True
    return None
