"""Rank workers and single-process references of the Hugging Face tensor-parallel tests: Llama,
Qwen3 and GPT-2 from small configs (random weights, nothing downloaded) split by their own
plans at tp 2, run through rt_cases.run_jobs in one spawn."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from zeroplan.runtime import initialize
from zeroplan.schemas import ConfigError

from rt_cases import SPEC
from tp_jobs import batch_of, reference as tp_reference, tp_plan

STEPS = 4


def hf_model(kind: str) -> nn.Module:
    """A small random "llama" (GQA: 4 heads, 2 key-value heads; token 0 is padding), "qwen3"
    (per-head q/k norms), "gpt2" (Conv1D layers, LM head tied to the embedding) or "llama-3-heads";
    vocabulary 97, so the vocabulary split is uneven (49 + 48 rows)."""
    import transformers

    torch.manual_seed(1234)
    vocab, small = SPEC.vocab, dict(num_hidden_layers=2, max_position_embeddings=32, tie_word_embeddings=False,
                                    use_cache=False)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, use_cache=False))
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, **small))
    heads = 3 if kind == "llama-3-heads" else 4
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=8 * heads, intermediate_size=64, num_attention_heads=heads,
        num_key_value_heads=2 if heads == 4 else heads, pad_token_id=0, **small))


def hf_batch(case: dict, step: int) -> dict:
    """The whole global batch of `step` (dp = 1); the model shifts the labels itself."""
    ids = batch_of(case, step, 0, 0)["input_ids"]
    return {"input_ids": ids, "labels": ids}


def train_hf(*, case: dict) -> dict | None:
    """STEPS steps with the model's own plan; rank 0 returns the consolidated parameters, the
    gradient norms, the local shapes and what the split attention modules hold."""
    model = hf_model(case["model"])
    engine = initialize(model, plan=tp_plan(case))
    norms, logits = [], None
    for step in range(STEPS):
        out = engine(**hf_batch(case, step))
        engine.backward(out.loss)
        engine.step()
        norms.append(engine.last_grad_norm)
        logits = tuple(out.logits.shape)
    full = engine.full_state_dict()
    module = engine.module
    attention = {n: {a: getattr(m, a) for a in ("num_heads", "split_size", "embed_dim") if hasattr(m, a)}
                 for n, m in module.named_modules() if n.endswith("layers.0.self_attn") or n.endswith("h.0.attn")}
    local = {n: tuple(p.shape) for n, p in module.named_parameters()}
    tied = module.lm_head.weight is module.get_input_embeddings().weight
    engine.close()
    if dist.get_rank():
        return None
    return {"params": full, "norms": norms, "local_shapes": local, "attention": attention, "logits": logits,
            "tied": tied, "lm_head": type(module.lm_head).__name__}


def refusals() -> dict | None:
    """Plans zeroplan cannot serve, each a ConfigError (on every rank alike): Hugging Face styles
    it refuses, and heads that tp does not divide."""
    case = {"model": "llama", "stage": 0, "dp": 1, "tp": dist.get_world_size(), "accum": 1}
    attempts = {
        "sequence_parallel": ("llama", {"model.norm": "sequence_parallel"}),
        "local_colwise": ("llama", {"model.layers.*.self_attn.q_proj": "local_colwise"}),
        "heads": ("llama-3-heads", None),
    }
    out = {}
    for label, (kind, extra) in attempts.items():
        model = hf_model(kind)
        kwargs = {} if extra is None else {"tp_plan": {**model.tp_plan, **extra}}
        try:
            initialize(model, plan=tp_plan(case), **kwargs).close()
            out[label] = "accepted"
        except ConfigError as e:
            out[label] = str(e)
    return out if dist.get_rank() == 0 else None


# -- single-process reference -------------------------------------------------------------------
def reference(case: dict) -> tuple[dict[str, torch.Tensor], list[float]]:
    """fp32, one process: torch.optim.AdamW on each whole global batch, clipped as the plan says."""
    return tp_reference(case, STEPS, model=hf_model(case["model"]), batch=lambda step: hf_batch(case, step))
