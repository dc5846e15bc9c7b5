"""`ModelSpec`: the shape of the model being trained, as the compiler's models need it.

Two decoder families are described analytically:
- `gpt`: zeroplan's built-in model (runtime/models): learned position embeddings, pre-LN
  blocks with LayerNorm and biased Linear layers, a GELU MLP, a tied LM head by default.
- `llama`: RMSNorm, no biases, rotary positions, grouped-query attention, a SwiGLU MLP.

The built-in presets (`tiny`, `small`, `medium`) are exactly the runtime's GPT presets; a test
checks that the parameter count here equals the real `nn.Module`'s. The large presets
(`1b`, `7b`, `13b`, `70b`) follow the published Llama shapes, for estimates only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .errors import ConfigError, Problem
from .types import FrozenModel


class ModelSpec(FrozenModel):
    name: str
    architecture: Literal["gpt", "llama"] = "gpt"
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (grouped-query attention); None means `heads`."""
    ffn: int = Field(ge=1)
    """MLP inner width."""
    vocab: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    """Tokens per sample."""
    tied_embeddings: bool = True
    """The LM head reuses the token embedding matrix."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype the checkpoint is stored in (the plan's precision decides the training dtype)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability on the attention probabilities and on the attention and MLP outputs
    (GPT-2's attn_pdrop / resid_pdrop, Megatron's). Above 0 backward keeps a one-byte mask per
    dropped element and the dropped-out softmax besides the softmax (Korthikanti et al. 2022,
    section 4.1). Only the memory model reads this; the built-in GPT has no dropout."""
    attention: Literal["eager", "flash"] = "eager"
    """How attention keeps what its backward needs. eager: the heads x seq x seq softmax is
    stored (Korthikanti et al. 2022's 5as/h term); flash: a fused kernel (FlashAttention) keeps
    only per-row statistics and recomputes the scores in backward. The memory model and the
    FLOP count (compiler/flops.py) read this."""

    @model_validator(mode="after")
    def _shape(self) -> "ModelSpec":
        problems = []
        if self.hidden % self.heads:
            problems.append(Problem("hidden", f"hidden({self.hidden}) is not divisible by heads({self.heads})"))
        if self.kv_heads is not None and self.heads % self.kv_heads:
            problems.append(Problem("kv_heads", f"heads({self.heads}) is not divisible by kv_heads({self.kv_heads})"))
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def embedding_params(self) -> int:
        """Token embeddings, plus learned positions for gpt."""
        positions = self.seq_len * self.hidden if self.architecture == "gpt" else 0
        return self.vocab * self.hidden + positions

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block."""
        h, f = self.hidden, self.ffn
        kv = (self.kv_heads or self.heads) * self.head_dim
        if self.architecture == "gpt":
            attention = h * 3 * h + 3 * h + h * h + h
            mlp = h * f + f + f * h + h
            norms = 2 * 2 * h
        else:
            attention = h * h + 2 * h * kv + h * h
            mlp = 3 * h * f
            norms = 2 * h
        return attention + mlp + norms

    @property
    def head_params(self) -> int:
        """Final norm plus an untied LM head."""
        final_norm = 2 * self.hidden if self.architecture == "gpt" else self.hidden
        return final_norm + (0 if self.tied_embeddings else self.vocab * self.hidden)

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.layers * self.layer_params + self.head_params

    @property
    def largest_layer_params(self) -> int:
        """The largest unit ZeRO-3 gathers at once: a block, or the (tied) embedding."""
        embedding = self.vocab * self.hidden
        return max(self.layer_params, embedding)

    @classmethod
    def load(cls, source: str | Path) -> "ModelSpec":
        """A preset name or a JSON file of ModelSpec fields."""
        if str(source) in MODEL_PRESETS:
            return MODEL_PRESETS[str(source)]
        path = Path(source)
        if not path.is_file():
            raise ConfigError(Problem("", f"unknown model preset or missing file {str(source)!r}",
                                      suggestion="presets: " + ", ".join(MODEL_PRESETS)), source="--model")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(Problem("", f"not a valid model spec: {' '.join(str(e).split())[:400]}"),
                              source=str(path)) from e


def is_model_function(ref: str) -> bool:
    """`--model module:function` (or `file.py:function`): a user model, not a preset or a JSON file."""
    return ":" in ref and not Path(ref).is_file()


def _gpt(name: str, *, layers: int, hidden: int, heads: int, vocab: int, seq_len: int) -> ModelSpec:
    # attention "flash": the built-in GPT calls F.scaled_dot_product_attention, whose kernels
    # (flash on CPU, flash or memory-efficient on CUDA) keep no seq x seq scores for backward.
    return ModelSpec(name=name, architecture="gpt", layers=layers, hidden=hidden, heads=heads,
                     ffn=4 * hidden, vocab=vocab, seq_len=seq_len, tied_embeddings=True, attention="flash")


def _llama(name: str, *, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
           tied: bool) -> ModelSpec:
    return ModelSpec(name=name, architecture="llama", layers=layers, hidden=hidden, heads=heads,
                     kv_heads=kv_heads, ffn=ffn, vocab=vocab, seq_len=4096, tied_embeddings=tied, dtype="bf16",
                     attention="flash")


MODEL_PRESETS: dict[str, ModelSpec] = {
    # The runtime's built-in GPT (about 1.5M, 25M and 100M parameters).
    "tiny": _gpt("tiny", layers=6, hidden=128, heads=4, vocab=2048, seq_len=128),
    "small": _gpt("small", layers=12, hidden=384, heads=6, vocab=8192, seq_len=256),
    "medium": _gpt("medium", layers=12, hidden=768, heads=12, vocab=16384, seq_len=512),
    # Published decoder shapes (Llama 3.2 1B; Llama 2 7B, 13B, 70B), for estimates.
    "1b": _llama("1b", layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192, vocab=128256, tied=True),
    "7b": _llama("7b", layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000, tied=False),
    "13b": _llama("13b", layers=40, hidden=5120, heads=40, kv_heads=40, ffn=13824, vocab=32000, tied=False),
    "70b": _llama("70b", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=32000, tied=False),
}
