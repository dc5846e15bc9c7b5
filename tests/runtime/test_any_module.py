"""Any nn.Module, exactly as PyTorch trains it, through `zeroplan.initialize(model, config=...)`.

- Hugging Face GPT-2 and Llama (small configs, random weights, nothing downloaded) at ZeRO 0-3
  with no shape argument: the shape is read from their config (heads right, so tp checks pass),
  marked approximate in the plan, and `engine(**batch)` with HF keyword arguments trains them to
  a single-process torch AdamW with Hugging Face Trainer's two groups (`param_groups.no_decay:
  true` against Trainer.get_decay_parameter_names).
- A parameter no rank computes with is untouched at every stage, bit for bit, and one used by
  some steps or one rank only steps as torch.optim steps it (its own Adam/SGD step count);
  `missing_grads: zero` is DeepSpeed's zero-fill; a checkpoint keeps the steps each parameter
  missed, so a resumed run steps on as the uninterrupted one.
- deepspeed.initialize's arguments: a torch AdamW instance with two groups and a LambdaLR over
  it, a callable SGD over model_parameters' groups with a callable StepLR: trained to the torch
  run of the same optimizer and scheduler.
- engine.eval() / engine.train() switch dropout, at ZeRO-3 too.
One spawn of 2 ranks runs every distributed case; the rest is one process, no process group.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import pytest
import torch

import zeroplan
from rt_any_model import GLOBAL_BATCH, Partly, WORLD, config, hf_model, reference
from rt_spawn import job_result, spawn_jobs
from rt_tolerance import compare
from zeroplan.compiler import compile as compile_plan
from zeroplan.runtime.from_config import infer_spec
from zeroplan.runtime.model_shape import module_params
from zeroplan.runtime.param_groups import no_decay_split
from zeroplan.schemas import CLUSTER_PRESETS, ConfigError, validate_config
from zeroplan.schemas.optim import HF_NO_DECAY

pytestmark = pytest.mark.numerics


def _case(name: str, model: str, stage: int, *, steps: int = 3, **extra) -> dict:
    return dict(id=name, model=model, stage=stage, steps=steps, **extra)


HF = [_case(f"{m}-z{s}", m, s, no_decay=True) for m in ("gpt2", "llama") for s in range(4)]
MISSING = ([_case(f"partly-adamw-z{s}", "partly", s, steps=4) for s in range(4)]
           + [_case(f"partly-sgd-z{s}", "partly", s, steps=4, optimizer="SGD") for s in (1, 3)]
           + [_case("partly-zero-fill-z2", "partly", 2, steps=4, missing_grads="zero"),
              _case("partly-resumed-z1", "partly", 1, steps=4, resume_after=2,
                    ckpt=os.path.join(tempfile.gettempdir(), f"zeroplan-any-module-{os.getpid()}"))])
CLIENT = [_case("client-instance-z2", "partly", 2, steps=4, optimizer=None, client="instance"),
          _case("client-callable-z3", "partly", 3, steps=4, optimizer=None, client="callable")]
TRAINED = HF + MISSING + CLIENT


@functools.lru_cache(maxsize=None)
def _spawned() -> dict:
    jobs = [(c["id"], "rt_any_model:train", {"case": c}) for c in TRAINED]
    jobs += [(f"eval-z{s}", "rt_any_model:eval_mode", {"stage": s}) for s in (0, 3)]
    try:
        return spawn_jobs(WORLD, jobs)
    finally:
        for case in TRAINED:
            if "ckpt" in case:
                shutil.rmtree(case["ckpt"], ignore_errors=True)


def _mismatches(case: dict, got: dict) -> list[str]:
    model = hf_model(case["model"]) if case["model"] != "partly" else Partly()
    return compare(got["params"], reference(case), model=model, plan=got["plan"], steps=case["steps"])


@pytest.mark.parametrize("case", HF, ids=[c["id"] for c in HF])
def test_hugging_face_models_train_from_their_config_alone(case, one_thread):
    got = job_result(_spawned(), case["id"])
    failures = _mismatches(case, got)
    assert not failures, f"{case['id']}: " + "; ".join(failures)
    assert got["model_source"].startswith("read from its Hugging Face config")
    assert any("approximate" in w for w in got["warnings"])


@pytest.mark.parametrize("case", MISSING, ids=[c["id"] for c in MISSING])
def test_parameters_without_gradients_step_as_torch_steps_them(case, one_thread):
    got = job_result(_spawned(), case["id"])
    failures = _mismatches(case, got)
    assert not failures, f"{case['id']}: " + "; ".join(failures)
    for name in ("never.weight", "never.bias"):
        untouched = torch.equal(got["params"][name], got["initial"][name])
        assert untouched == (case.get("missing_grads") != "zero"), name


@pytest.mark.parametrize("case", CLIENT, ids=[c["id"] for c in CLIENT])
def test_a_torch_optimizer_and_scheduler_are_stepped_as_torch_steps_them(case, one_thread):
    got = job_result(_spawned(), case["id"])
    failures = _mismatches(case, got)
    assert not failures, f"{case['id']}: " + "; ".join(failures)
    if case["client"] == "instance":  # LambdaLR: 1 / (1 + step) of each group's lr
        want = [[3e-3 / (1 + s), 1e-2 / (1 + s)] for s in range(case["steps"])]
    else:  # StepLR(step_size=2, gamma=0.5) of the groups' 0.05 and 0.01
        want = [[0.05 * 0.5 ** (s // 2), 1e-2 * 0.5 ** (s // 2)] for s in range(case["steps"])]
    assert sum(got["lrs"], []) == pytest.approx(sum(want, []))


@pytest.mark.parametrize("stage", [0, 3])
def test_eval_and_train_switch_the_models_mode(stage):
    got = job_result(_spawned(), f"eval-z{stage}")
    assert got == {"returns_engine": True, "module_eval": True, "train_differs": True, "eval_equal": True,
                   "finite": True, "is_the_model": True, "trains_after": True}


# -- one process ----------------------------------------------------------------------------------
def test_the_shape_comes_from_the_hugging_face_config():
    for kind, want in (("gpt2", dict(architecture="gpt", heads=4, kv_heads=None, ffn=128, seq_len=16,
                                     tied_embeddings=True)),
                       ("llama", dict(architecture="llama", heads=4, kv_heads=2, ffn=64, seq_len=32,
                                      tied_embeddings=False))):
        model = hf_model(kind)
        spec, source = infer_spec(model)
        assert {k: getattr(spec, k) for k in want} == want and spec.layers == 2 and spec.hidden == 32
        assert spec.total_params == module_params(model), kind
        assert "parameters" in source and "shape counts" not in source
        plan = compile_plan(validate_config({**config({"stage": 1}), "train_batch_size": 4, "parallel": {"tp": 2}},
                                            world_size=2),
                            spec, CLUSTER_PRESETS["cpu"], nproc_per_node=2)
        assert plan.parallel.tp == 2  # tp(2) divides heads(4): read from the config, not guessed


def test_a_module_without_a_config_is_measured():
    spec, source = infer_spec(Partly())
    assert source.startswith("measured from its module tree") and spec.total_params > 0


def test_no_decay_true_is_hugging_face_trainers_rule():
    import transformers

    for kind in ("gpt2", "llama"):
        model = hf_model(kind)
        groups = no_decay_split([{"params": list(model.parameters())}], model=model, patterns=HF_NO_DECAY)
        names = {id(p): n for n, p in model.named_parameters()}
        decays = set(transformers.Trainer.get_decay_parameter_names(None, model))
        assert {names[id(p)] for p in groups[0]["params"]} == decays & set(names.values()), kind
        assert groups[1]["weight_decay"] == 0.0 and not {names[id(p)] for p in groups[1]["params"]} & decays


def test_what_initialize_refuses():
    model = Partly()
    base = config({"stage": 1})
    no_block = {k: v for k, v in base.items() if k != "optimizer"}
    cases = [
        (dict(config=no_block, optimizer=torch.optim.RMSprop(model.parameters())), "RMSprop cannot be stepped"),
        (dict(config=base, optimizer=torch.optim.AdamW(model.parameters())), "both give the optimizer"),
        (dict(config={**no_block, "scheduler": {"type": "WarmupLR"}}, optimizer=torch.optim.SGD(model.parameters()),
              lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1)), "both give the learning-rate"),
        (dict(config=no_block, optimizer=torch.optim.AdamW(model.parameters(), amsgrad=True)), "amsgrad"),
        (dict(config=base, model_parameters=[torch.nn.Parameter(torch.zeros(2))]), "not a parameter of the model"),
        (dict(config=base, model_parameters=[{"params": [model.head.weight]}, {"params": [model.head.weight]}]),
         "more than one group"),
        (dict(config={**no_block, "param_groups": {"no_decay": True}},
              optimizer=torch.optim.AdamW(model.parameters())), "brings its own groups"),
        (dict(config=base, lr_scheduler=torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters()), 1)),
         "steps an optimizer initialize was not given"),
        (dict(config={**base, "optimizer": {"type": "Lamb"}, "param_groups": {"no_decay": True}}),
         "Lamb steps the whole shard"),
        (dict(config={**no_block, "optimizer": {"type": "SGD", "params": {"momentum": 0.9}}},
              model_parameters=[{"params": list(model.parameters()), "momentum": 0.5}]), "cannot set momentum"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            zeroplan.initialize(model, **kwargs)


def test_config_reaches_the_plan():
    plan = compile_plan(validate_config({**config({"stage": 0}), "train_batch_size": GLOBAL_BATCH // WORLD,
                                         "param_groups": {"no_decay": ["bias", "type:LayerNorm"],
                                                          "missing_grads": "zero"}}),
                        infer_spec(Partly())[0], CLUSTER_PRESETS["cpu"], nproc_per_node=1)
    assert plan.optimizer.no_decay == ("bias", "type:LayerNorm") and plan.optimizer.missing_grads == "zero"
    with pytest.raises(ConfigError, match="not a regular expression"):
        validate_config({"train_batch_size": 2, "param_groups": {"no_decay": ["("]}})
