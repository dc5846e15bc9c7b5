"""FLOPs of one training step on one rank, from a `ModelSpec`: the figure the cost model times
and the runtime's FLOPs profiler (runtime/flops.py) is checked against. Torch-free.

Counted the way torch's FlopCounterMode counts (torch/utils/flop_counter.py): matrix products
only, 2 FLOPs per multiply-add; bias adds, norms, activations, embedding lookups, the softmax
and the loss count nothing. Per transformer block and token, for hidden h, MLP width f,
key/value width kv and sequence length s:
- gpt: qkv 2·h·3h, out-projection 2·h·h, MLP 2·h·f + 2·f·h;
- llama: q and o 2·h·h each, k and v 2·h·kv each, gated MLP 3 · 2·h·f;
- attention: the scores Q·Kᵀ and the weighted sum P·V, 2·s·h each (every query against all s
  keys: torch counts the causal mask's zero half too);
and on the stage holding the LM head, 2·h·vocab. Under tensor parallelism one rank computes
1/tp of every product (Megatron's column and row splits, the vocabulary-parallel head).

Backward computes two products per forward product (the input's and the weight's gradient):
2x its forward. Fused attention ("flash": FlashAttention, Dao et al. 2022, section 3.1; torch's
CPU flash kernel alike) recomputes the scores in backward: five products, 2.5x its forward;
"eager" attention four, 2x. Activation checkpointing runs each block's forward again in
backward; the embeddings and LM head are not recomputed (Korthikanti et al. 2022, section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.schemas import ClusterSpec, ModelSpec


@dataclass(frozen=True)
class StepFlops:
    """FLOPs one rank runs in one optimizer step, by phase."""

    forward: int
    backward: int
    recompute: int = 0
    """Forwards run again in backward by activation checkpointing."""

    @property
    def model(self) -> int:
        """Forward and backward without the recompute: MFU's numerator (Chowdhery et al. 2022,
        appendix B: rematerialisation is not model work)."""
        return self.forward + self.backward

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute


def block_matmul_flops(model: ModelSpec) -> int:
    """Forward FLOPs per token of one whole block's weight products (tp = 1)."""
    h, f = model.hidden, model.ffn
    if model.architecture == "gpt":
        return 2 * h * (3 * h + h + 2 * f)
    kv = (model.kv_heads or model.heads) * model.head_dim
    return 2 * h * (2 * h + 2 * kv + 3 * f)


def step_flops(model: ModelSpec, *, tokens: int, layers: int, head: bool, tp: int = 1,
               recompute: bool = False) -> StepFlops:
    """FLOPs of `tokens` (samples x model.seq_len, every micro-batch of the step) through `layers`
    blocks and, when `head`, the LM head, on one of `tp` ranks; exact when tp divides the widths,
    as the degree rules require."""
    weights = tokens * layers * block_matmul_flops(model) // tp
    attention = tokens * layers * 4 * model.seq_len * model.hidden // tp
    lm_head = tokens * 2 * model.hidden * -(-model.vocab // tp) if head else 0
    attention_backward = attention * 5 // 2 if model.attention == "flash" else 2 * attention
    return StepFlops(forward=weights + attention + lm_head,
                     backward=2 * (weights + lm_head) + attention_backward,
                     recompute=weights + attention if recompute else 0)


def peak_flops(cluster: ClusterSpec, *, dtype: str) -> float:
    """FLOP/s of a large matmul on one device in the training dtype `dtype` (fp32, bf16, fp16)."""
    rates = cluster.rates
    return rates.matmul_flops_fp32 if dtype == "fp32" else rates.matmul_flops_16bit
