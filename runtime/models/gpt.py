"""The built-in GPT decoder, built from a `ModelSpec` (architecture "gpt").

Learned position embeddings; pre-LN blocks (LayerNorm with bias, fused qkv Linear(h, 3h) and
out-projection Linear(h, h), MLP Linear(h, ffn) + GELU + Linear(ffn, h), all with biases); a
final LayerNorm; the LM head tied to the token embedding (GPT-2, Radford et al. 2019). Its
parameter count is exactly `spec.total_params` (tests check it). Tensor parallelism
(runtime/parallel/tensor_plan.py, GPT_PLAN) replaces its Linear/Embedding layers and loss in
place; attention reads its local head count from the qkv weight. With sequence parallelism
(GPT_SEQUENCE_PARALLEL_PLAN) the residual stream and the norms hold this tp rank's part of the
sequence ([batch, seq/tp, hidden]); the layers gather and scatter it, this code is unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from zeroplan.schemas import ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.head_dim = spec.hidden // spec.heads
        self.qkv = nn.Linear(spec.hidden, 3 * spec.hidden)
        self.proj = nn.Linear(spec.hidden, spec.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        b, t, _ = qkv.shape  # the whole sequence: with sequence parallelism x holds 1/tp of it
        heads = self.qkv.weight.shape[0] // (3 * self.head_dim)  # this rank's heads under tensor parallelism
        q, k, v = qkv.view(b, t, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.hidden)
        self.attn = Attention(spec)
        self.ln2 = nn.LayerNorm(spec.hidden)
        self.fc = nn.Linear(spec.hidden, spec.ffn)
        self.out = nn.Linear(spec.ffn, spec.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def embed(wte: nn.Module, wpe: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """Token plus learned position embeddings of [batch, seq] ids."""
    t = input_ids.shape[1]
    if t > wpe.num_embeddings:
        raise ValueError(f"sequence length {t} exceeds the model's seq_len {wpe.num_embeddings}")
    return wte(input_ids) + wpe(torch.arange(t, device=input_ids.device))


def next_token_loss(loss: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`loss` (cross-entropy, or its vocabulary-parallel form) of [batch, seq, vocab] logits, in fp32."""
    return loss(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


class Embeddings(nn.Module):
    """The first pipeline layer: ids -> hidden states (the GPT's own wte and wpe modules)."""

    def __init__(self, wte: nn.Module, wpe: nn.Embedding):
        super().__init__()
        self.wte, self.wpe = wte, wpe

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed(self.wte, self.wpe, input_ids)


class Head(nn.Module):
    """The last pipeline layer: hidden states -> logits (the GPT's own ln_f and lm_head)."""

    def __init__(self, ln_f: nn.LayerNorm, lm_head: nn.Module):
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.architecture != "gpt" or spec.kv_heads not in (None, spec.heads):
            raise ValueError(f"the built-in model is a GPT; spec {spec.name!r} is {spec.architecture} "
                             f"(kv_heads={spec.kv_heads}); use a gpt preset: tiny, small, medium")
        if spec.dropout:
            raise ValueError(f"the built-in GPT has no dropout; spec {spec.name!r} asks for {spec.dropout} "
                             "(set dropout 0, or train your own model with --model module:function)")
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab, spec.hidden)
        self.wpe = nn.Embedding(spec.seq_len, spec.hidden)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.ln_f = nn.LayerNorm(spec.hidden)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tied_embeddings:
            self.lm_head.weight = self.wte.weight
        self.loss = nn.CrossEntropyLoss()
        """A module, so tensor parallelism can swap in the vocabulary-parallel cross-entropy."""
        self.checkpoint_fn = None
        """Activation checkpointing's hook (runtime/checkpointing.py): when set, each block runs
        as `checkpoint_fn(block, x)` and is recomputed in backward."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's init over every layer (normal(0, 0.02) weights, zero biases), after each layer's
        own torch init: a model built on the meta device replays both (runtime/meta_replay.py)."""
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab], or the mean next-token cross-entropy when `labels` is given."""
        x = embed(self.wte, self.wpe, input_ids)
        for block in self.blocks:
            x = block(x) if self.checkpoint_fn is None else self.checkpoint_fn(block, x)
        logits = self.lm_head(self.ln_f(x))
        if labels is None:
            return logits
        return next_token_loss(self.loss, logits, labels)

    def pipeline_layers(self) -> list[nn.Module]:
        """The forward as single-tensor layers for pipeline stages (parallel/pipeline.py): the
        embeddings, each block, the final norm and LM head; they share this model's modules."""
        return [Embeddings(self.wte, self.wpe), *self.blocks, Head(self.ln_f, self.lm_head)]

    def pipeline_checkpointable(self, layer: nn.Module) -> bool:
        """Pipeline stages recompute the transformer blocks, as this model does unpipelined."""
        return isinstance(layer, Block)

    def pipeline_loss(self):
        """The last stage's loss(logits, labels); it holds the loss module only, not the model."""
        return functools.partial(next_token_loss, self.loss)
