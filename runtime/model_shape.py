"""A ModelSpec read from a Hugging Face model's config (`model.config`), for a model that
carries no spec of its own.

transformers names the same shape differently per family; the first name present is taken:
  layers   num_hidden_layers | n_layer | num_layers
  hidden   hidden_size | n_embd | d_model
  heads    num_attention_heads | n_head | num_heads;   kv_heads: num_key_value_heads
  ffn      intermediate_size | n_inner | ffn_dim (GPT-2's n_inner None means 4 * hidden)
  vocab    vocab_size;   seq_len: max_position_embeddings | n_positions | n_ctx
  tied     the model's output embedding is its input embedding (else tie_word_embeddings)
A config with `rms_norm_eps` describes a Llama-like decoder (RMSNorm, no biases, gated MLP),
any other a GPT-like one (LayerNorm, biases, learned positions). For GPT-2 and Llama the
spec's parameter count is the module's exactly; for other families it is an approximation,
and `describe` says how far off. seq_len is the longest sample the model takes, so activation
estimates are those of full-length samples.
"""

from __future__ import annotations

from torch import nn

from zeroplan.schemas import ConfigError, ModelSpec

FLASH = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention implementations that keep no seq x seq scores for backward (ModelSpec.attention)."""
DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def spec_from_hf_config(model: nn.Module, *, seq_len: int | None = None) -> ModelSpec | None:
    """The spec `model.config` describes, or None when the model has no such config or it lacks
    the shape (then the caller measures the module tree). `seq_len` overrides the config's."""
    config = getattr(model, "config", None)
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    vocab = _first(config, "vocab_size")
    if config is None or not all(isinstance(v, int) for v in (layers, hidden, heads, vocab)):
        return None
    dropout = max((v for v in (_first(config, "attn_pdrop", "attention_dropout"), _first(config, "resid_pdrop"))
                   if isinstance(v, (int, float)) and 0 <= v < 1), default=0.0)
    param = next(model.parameters(), None)
    try:
        return ModelSpec(name=type(model).__name__, architecture="llama" if hasattr(config, "rms_norm_eps") else "gpt",
                         layers=layers, hidden=hidden, heads=heads, kv_heads=_first(config, "num_key_value_heads"),
                         ffn=_first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                         vocab=vocab, seq_len=seq_len or _first(config, "max_position_embeddings", "n_positions",
                                                                "n_ctx", default=1),
                         tied_embeddings=_tied(model, config), dropout=float(dropout),
                         dtype=DTYPES.get(str(param.dtype), "fp32") if param is not None else "fp32",
                         attention="flash" if getattr(config, "_attn_implementation", None) in FLASH else "eager")
    except (ConfigError, ValueError):  # a shape ModelSpec cannot describe (heads not dividing hidden, ...)
        return None


def _tied(model: nn.Module, config) -> bool:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if callable(get_in) and callable(get_out):
        emb, head = get_in(), get_out()
        if emb is not None and head is not None:
            return getattr(head, "weight", None) is getattr(emb, "weight", False)
    return bool(getattr(config, "tie_word_embeddings", True))


def module_params(model: nn.Module) -> int:
    """Every parameter of the module once (tied ones once, frozen ones too)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def describe(spec: ModelSpec, *, model: nn.Module, source: str) -> str:
    """`source`, and how far the spec's parameter count is from the module's when it is."""
    actual = module_params(model)
    if spec.total_params == actual:
        return f"{source}: {actual:,} parameters"
    return f"{source}: the shape counts {spec.total_params:,} parameters, the module has {actual:,}"
