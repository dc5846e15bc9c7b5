"""A small Hugging Face Llama built from a config (random weights, nothing downloaded), for
`zeroplan train|autotune --model bench/llama_model.py:build`: 4 decoder layers of width 128
(8 heads, 4 key-value heads), vocabulary 2048, sequences of 64 tokens of random ids, each
rank its own."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

VOCAB, SEQ = 2048, 64


def build() -> tuple[nn.Module, callable]:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ,
                                      tie_word_embeddings=False, use_cache=False)
    model = transformers.LlamaForCausalLM(config)

    def get_batch(micro_batch_size: int, index: int) -> dict[str, torch.Tensor]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        g = torch.Generator().manual_seed(index * world + rank)
        ids = torch.randint(0, VOCAB, (micro_batch_size, SEQ), generator=g)
        return {"input_ids": ids, "labels": ids}

    return model, get_batch
