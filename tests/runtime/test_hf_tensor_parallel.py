"""Hugging Face models split by their own tensor-parallel plans train like one process.

Llama and Qwen3 (random weights from small configs) bring transformers' `tp_plan`: q/k/v,
gate/up column-parallel, o/down row-parallel, the embedding split by vocabulary
('embedding_rowwise'), the LM head's output gathered ('colwise_gather_output') for the model's
own loss, Qwen3's per-head q/k norms whole with their gradients summed over tp
('replicated_with_grad_allreduce'). GPT-2 has none in transformers and gets zeroplan's
(GPT2_BASE_PLAN): its Conv1D layers split on their [in, out] weights, the fused [q|k|v] by
heads, the embedding and its tied LM head by vocabulary. Each trains 4 AdamW steps at tp 2
(clipped at 0.5) and is compared with torch.optim.AdamW on the whole batch in one process
(rt_tolerance: 1e-5 in fp32; GPT-2's key bias, whose gradient is analytically zero, to the
drift bound). One spawn of 2 processes.
"""

from __future__ import annotations

import functools

import pytest
import torch

from rt_spawn import job_result, spawn_jobs
from rt_tolerance import compare
from hf_tp_jobs import STEPS, hf_model, reference
from tp_jobs import tp_plan
from zeroplan.runtime.parallel import GPT2_BASE_PLAN, Colwise, Replicate, Rowwise, Vocab, default_plan
from zeroplan.runtime.parallel.tensor_styles import resolve_style
from zeroplan.schemas import ConfigError

pytest.importorskip("transformers")
pytestmark = pytest.mark.numerics


def _case(model, stage):
    return dict(id=f"{model}-z{stage}-tp2", model=model, stage=stage, dp=1, tp=2, accum=1)


CASES = [_case("llama", 1), _case("qwen3", 0), _case("gpt2", 3)]


@functools.lru_cache(maxsize=None)
def _spawned() -> dict:
    jobs = [(c["id"], "hf_tp_jobs:train_hf", {"case": c}) for c in CASES]
    return spawn_jobs(2, jobs + [("refused", "hf_tp_jobs:refusals", {})])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_own_plan_trains_to_the_single_process_parameters(case, one_thread):
    got = job_result(_spawned(), case["id"])
    want, norms = reference(case)
    assert set(got["params"]) == set(want), "the export has the plain model's keys"
    assert all(got["params"][k].shape == v.shape for k, v in want.items())
    failures = compare(got["params"], want, model=hf_model(case["model"]), plan=tp_plan(case), steps=STEPS)
    assert not failures, f"{case['id']}: " + "; ".join(failures)
    assert got["norms"] == pytest.approx(norms, rel=1e-5), "each gradient counted once, whole"
    assert got["logits"][-1] == 97 and got["lm_head"] == "ColumnParallelLinear", "the head's output is gathered"


def test_llama_layers_hold_whole_heads():
    got = job_result(_spawned(), "llama-z1-tp2")
    shapes = got["local_shapes"]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (16, 32)  # 2 of 4 heads of head_dim 8
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (8, 32)  # 1 of 2 key-value heads
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 16)
    assert shapes["model.embed_tokens.weight"] == (49, 32) and shapes["lm_head.weight"] == (49, 32)
    assert shapes["model.norm.weight"] == (32,)


def test_gpt2_conv1d_split_on_its_transposed_weight():
    got = job_result(_spawned(), "gpt2-z3-tp2")
    shapes = got["local_shapes"]
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (32, 48)  # [in, q|k|v of 2 of 4 heads]
    assert shapes["transformer.h.0.attn.c_attn.bias"] == (48,)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (16, 32)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (32, 64)
    assert got["attention"]["transformer.h.0.attn"] == {"num_heads": 2, "split_size": 16, "embed_dim": 16}
    assert got["tied"], "the LM head still shares the embedding's (split) weight"


def test_refused_styles_and_heads_name_what_to_change():
    got = job_result(_spawned(), "refused")
    assert "tp_plan['model.norm']" in got["sequence_parallel"]
    assert "style 'sequence_parallel' is not supported" in got["sequence_parallel"]
    assert "tp_plan['model.layers.*.self_attn.q_proj']" in got["local_colwise"]
    assert "'local_colwise' is not supported" in got["local_colwise"]
    assert "parallel.tp: tp(2) splits 'model.layers.0.self_attn.q_proj' into [12, 12]" in got["heads"]
    assert "not whole heads of head_dim 8" in got["heads"]


def test_hugging_face_styles_translate():
    gathered = Colwise(gather_output=True)
    assert resolve_style("p", "colwise_gather_output") == gathered == resolve_style("p", "colwise_rep")
    assert resolve_style("p", "rowwise_rep") == Rowwise(input_is_parallel=False)
    assert resolve_style("p", "embedding_rowwise") == Vocab() and resolve_style("p", "replicate") == Replicate()
    assert resolve_style("p", "replicated_with_grad_allreduce") == Replicate(sum_grad=True)
    assert resolve_style("p", "packed_colwise") == Colwise(fused=2)
    with pytest.raises(ConfigError, match=r"tp_plan\['p'\]: Hugging Face's tensor-parallel style 'moe_tp_experts'"):
        resolve_style("p", "moe_tp_experts")


def test_default_plans_of_hugging_face_models():
    llama = hf_model("llama")
    plan = default_plan(llama, tp=2)
    assert plan["lm_head"] == "colwise_gather_output" and plan["model.layers.*.self_attn.q_proj"] == "colwise"
    gpt2 = default_plan(hf_model("gpt2"), tp=2)
    assert gpt2 == {"lm_head": "colwise_gather_output", **{f"transformer.{k}": v for k, v in GPT2_BASE_PLAN.items()}}


def test_plan_joined_from_config_and_class_without_a_tp_plan_property():
    """Where transformers has no `tp_plan` on the instance, the class's `_tp_plan` and the
    config's `base_model_tp_plan` under base_model_prefix are joined as transformers joins them;
    entries naming no module are left out, one naming a bare parameter is refused."""

    class Config:
        base_model_tp_plan = {"layers.*.up": "colwise", "layers.*.absent": "rowwise"}

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"up": torch.nn.Linear(4, 8)})])
            self.gate = torch.nn.Parameter(torch.ones(2))

    class ForLM(torch.nn.Module):
        base_model_prefix = "model"
        _tp_plan = {"head": "colwise_gather_output"}

        def __init__(self):
            super().__init__()
            self.config, self.model, self.head = Config(), Base(), torch.nn.Linear(8, 5)

    assert default_plan(ForLM(), tp=2) == {"head": "colwise_gather_output", "model.layers.*.up": "colwise"}
    Config.base_model_tp_plan = {"gate": "replicate"}
    with pytest.raises(ConfigError, match=r"tp_plan\['model.gate'\]: the model's plan names parameter 'model.gate'"):
        default_plan(ForLM(), tp=2)
