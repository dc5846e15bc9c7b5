"""Sharded initialisation: a model built on the meta device, materialised by `initialize`.

- Hugging Face Llama (and GPT-2: tied embeddings, transformers' Conv1D) built under
  `torch.device("meta")` train at ZeRO-3 on 2 ranks to the single-process torch AdamW run of the
  same model built eagerly under the same seed; at start-up each rank's engine holds its shard
  (ceil(numel / 2) of every parameter) and the parameters themselves hold one placeholder
  element each, and that shard is bit for bit this rank's chunk of the eager model; buffers
  (rotary inv_freq) equal the eager ones; the generator ends where the eager build leaves it.
- At ZeRO-1 the meta model is made whole, equal to the eager one.
- A parameter or buffer nothing initialises is a ConfigError naming it; a buffer recomputed
  by the module's reset_parameters is right; tp > 1 and a model mixing meta and materialised
  parameters are refused; the shape is read from a meta model's config.
One spawn of 2 ranks runs every distributed case.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from rt_any_model import WORLD, hf_model, reference
from rt_meta_jobs import meta_model
from rt_spawn import job_result, spawn_jobs
from rt_tolerance import compare
from zeroplan.compiler import compile as compile_plan
from zeroplan.runtime.from_config import infer_spec
from zeroplan.runtime.meta_init import check_meta_model
from zeroplan.schemas import CLUSTER_PRESETS, ConfigError, validate_config

CASES = [dict(id="llama-z3", model="llama", stage=3, steps=3, no_decay=True),
         dict(id="gpt2-z3", model="gpt2", stage=3, steps=3, no_decay=True),
         dict(id="llama-z1", model="llama", stage=1, steps=3, no_decay=True)]


@functools.lru_cache(maxsize=None)
def _spawned() -> dict:
    jobs = [(c["id"], "rt_meta_jobs:train_meta", {"case": c}) for c in CASES]
    jobs.append(("refusals", "rt_meta_jobs:refusals", {"stage": 3}))
    return spawn_jobs(WORLD, jobs)


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_a_meta_model_trains_as_the_eager_one(case, one_thread):
    got = job_result(_spawned(), case["id"])
    failures = compare(got["params"], reference(case), model=hf_model(case["model"]), plan=got["plan"],
                       steps=case["steps"])
    assert not failures, f"{case['id']}: " + "; ".join(failures)
    assert got["model_source"].startswith("read from its Hugging Face config")
    for rank, start in enumerate(got["start_up"]):
        assert start["buffers_equal"] and start["rng_equal"], (rank, start)
        if case["stage"] < 3:
            assert start["whole_equal"], (rank, start)


@pytest.mark.parametrize("case", [c for c in CASES if c["stage"] == 3], ids=lambda c: c["id"])
def test_each_rank_materialises_only_its_shard(case):
    got = job_result(_spawned(), case["id"])
    for rank, start in enumerate(got["start_up"]):
        assert start["world"] == WORLD and start["shard_equal"], (rank, start)
        assert start["shard_numel"] == start["chunks_numel"] < start["model_numel"] * 0.55, (rank, start)
        assert start["master_bytes"] == 4 * start["shard_numel"], (rank, start)  # fp32: the partition is the master
        # every parameter released: one placeholder element each, far below any one parameter
        assert start["param_bytes"] < start["largest_param_bytes"], (rank, start)


def test_what_cannot_be_initialised_is_named():
    got = job_result(_spawned(), "refusals")
    (path, message, suggestion), = got["drawn"]
    assert path == "model.scale" and "never written" in message and "Drawn" in message
    assert "reset_parameters" in suggestion
    (path, message, _), = got["computed"]
    assert path == "model.freq" and "Computed" in message
    assert got["recomputed"] is True


def test_tp_and_mixed_models_are_refused():
    with torch.device("meta"):
        model = hf_model("llama")
    spec, _ = infer_spec(model)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
           "parallel": {"tp": 2}}
    plan = compile_plan(validate_config(cfg, world_size=2), spec, CLUSTER_PRESETS["cpu"], nproc_per_node=2)
    with pytest.raises(ConfigError) as e:
        check_meta_model(model, plan=plan)
    assert [p.path for p in e.value.problems] == ["parallel.tp"]
    model.lm_head = nn.Linear(32, 97, bias=False)  # materialised, beside meta ones
    plan = plan.model_copy(update={"parallel": plan.parallel.model_copy(update={"tp": 1})})
    with pytest.raises(ConfigError) as e:
        check_meta_model(model, plan=plan)
    (problem,) = e.value.problems
    assert problem.path == "model" and "'lm_head.weight'" in problem.message


def test_the_shape_of_a_meta_model_is_read_as_the_eager_ones():
    for kind in ("gpt2", "llama"):
        meta, eager = meta_model(kind), hf_model(kind)
        assert all(p.is_meta for p in meta.parameters())
        assert infer_spec(meta) == infer_spec(eager), kind
