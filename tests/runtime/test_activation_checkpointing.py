"""Activation checkpointing does what the plan says: the blocks are recomputed in backward, and
training gives the parameters of single-process PyTorch without checkpointing (same bounds as
the equivalence tests, rt_tolerance), under ZeRO 0-3, tensor parallelism with partitioned
checkpoints (a sequence shard kept as it is under sequence parallelism), pipeline parallelism and
host-memory checkpoints. One spawn of 2 ranks, one of 4."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from rt_cases import SPEC, STEPS, build, micro_batch, mismatches, reference_global
from rt_spawn import job_result, spawn_jobs
from rt_tolerance import compare
from tp_jobs import STEPS as TP_STEPS
from tp_jobs import build_model as tp_model
from tp_jobs import reference as tp_reference
from tp_jobs import tp_plan
from zeroplan.runtime.checkpointing import ActivationCheckpointing, install
from zeroplan.schemas import ConfigError
from zeroplan.schemas.plan import ActivationCheckpointingPlan

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)

ON = ActivationCheckpointingPlan(enabled=True)
PARTITIONED = ActivationCheckpointingPlan(enabled=True, partition_activations=True)
ON_HOST = ActivationCheckpointingPlan(enabled=True, partition_activations=True, cpu_checkpointing=True)


def _zero(stage, world, accum, ac=ON):
    return dict(id=f"zero-z{stage}-w{world}-a{accum}-{_tag(ac)}", kind="zero", model="gpt", stage=stage, world=world,
                accum=accum, checkpointing=ac)


def _tp(stage, dp, tp, ac, sp=False):
    return dict(id=f"tp-z{stage}-dp{dp}-tp{tp}-{_tag(ac)}" + ("-sp" if sp else ""), kind="tp", model="gpt",
                stage=stage, dp=dp, tp=tp, accum=1, checkpointing=ac, sp=sp)


def _pp(stage, dp, pp, accum, ac=ON):
    return dict(id=f"pp-z{stage}-dp{dp}-pp{pp}-a{accum}-{_tag(ac)}", kind="pp", model="gpt", stage=stage, dp=dp,
                pp=pp, accum=accum, checkpointing=ac)


def _tag(ac: ActivationCheckpointingPlan) -> str:
    return "+".join(k for k in ("partition_activations", "cpu_checkpointing") if getattr(ac, k)) or "on"


# A user's model that calls torch's checkpoint itself, with the plan's checkpointing off: torch
# stops each recompute early, inside the block's last module, and ZeRO-3 must still release it.
USERS_OWN = dict(_zero(3, 2, 3, ActivationCheckpointingPlan()), id="zero-z3-w2-a3-users-torch-checkpoint",
                 model="gpt-torch-checkpoint")
CASES = {
    2: [_zero(s, 2, a) for s, a in ((0, 1), (1, 3), (2, 1), (3, 3))] + [_zero(3, 2, 1, ON_HOST), USERS_OWN,
        _tp(1, 1, 2, PARTITIONED), _tp(0, 1, 2, ON), _tp(3, 1, 2, PARTITIONED, sp=True), _pp(1, 1, 2, 3)],
    4: [_tp(3, 2, 2, ON_HOST), _pp(2, 2, 2, 2)],
}
ALL = [c for cases in CASES.values() for c in cases]
WORKERS = {"zero": "train_case", "tp": "tp_jobs:train_tp", "pp": "rt_pipeline:pp_train"}


@functools.lru_cache(maxsize=None)
def _spawned(world: int) -> dict:
    return spawn_jobs(world, [(c["id"], WORKERS[c["kind"]], {"case": c}) for c in CASES[world]])


@functools.lru_cache(maxsize=None)
def _reference(kind: str) -> dict:
    if kind == "tp":
        return tp_reference(dict(model="gpt", stage=0, dp=1, tp=1, accum=1))[0]
    steps = STEPS if kind == "zero" else 4
    return reference_global(dict(model="gpt", stage=0, world=1, accum=1), steps=steps)


def _micro_steps(case: dict) -> int:
    if case["kind"] == "zero":
        return STEPS * case["accum"]
    return (TP_STEPS if case["kind"] == "tp" else 4) * case["accum"]


@pytest.mark.parametrize("case", ALL, ids=[c["id"] for c in ALL])
def test_checkpointed_training_matches_single_process(case, one_thread):
    world = case["world"] if case["kind"] == "zero" else case["dp"] * case.get("tp", 1) * case.get("pp", 1)
    got = job_result(_spawned(world), case["id"])
    want = _reference(case["kind"])
    if case["kind"] == "tp":
        failures = compare(got["params"], want, model=tp_model("gpt"), plan=tp_plan(case), steps=TP_STEPS)
    else:
        steps = STEPS if case["kind"] == "zero" else 4
        failures = mismatches(got["params"], want, case=dict(model="gpt", stage=0, world=1, accum=1), steps=steps)
    assert not failures, f"{case['id']}: " + "; ".join(failures)
    # Every block of every micro-batch went through the checkpoint: on rank 0 (each dp and tp
    # rank runs all blocks), or summed over the pipeline stages of every dp replica.
    replicas = case["dp"] if case["kind"] == "pp" else 1
    blocks = SPEC.layers if case["checkpointing"].enabled else 0
    assert got["recomputed"] == replicas * blocks * _micro_steps(case), got["recomputed"]


def _saved_bytes(model: nn.Module, *, inside: list[nn.Module]) -> tuple[int, int]:
    """(all, inside `inside` modules' forwards) bytes autograd saves for backward in one forward
    and loss, parameters not counted."""
    params = {p.data_ptr() for p in model.parameters()}
    totals, depth = [0, 0], [0]

    def pack(t):
        if t.data_ptr() not in params:
            totals[0] += t.numel() * t.element_size()
            totals[1] += t.numel() * t.element_size() if depth[0] else 0
        return t

    handles = [m.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)) for m in inside]
    handles += [m.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)) for m in inside]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**micro_batch(dict(model="gpt", stage=0, world=1, accum=1), 0, 0, 0)).backward()
    for h in handles:
        h.remove()
    return totals[0], totals[1]


def test_a_checkpointed_block_keeps_nothing_for_backward(one_thread):
    """Without checkpointing the blocks save activations for backward; with it they save none
    (their inputs are kept by the checkpoint, the rest is recomputed), and everything outside
    the blocks is saved as before."""
    plain = build("gpt")
    total_off, inside_off = _saved_bytes(plain, inside=list(plain.blocks))
    checkpointed = build("gpt")
    install(checkpointed, ActivationCheckpointing(plan=ON))
    total_on, inside_on = _saved_bytes(checkpointed, inside=list(checkpointed.blocks))
    assert inside_off > 0 and inside_on == 0
    assert total_on == total_off - inside_off


def test_a_hugging_face_model_takes_it_through_gradient_checkpointing(one_thread):
    """A GPT-2 built from a small config (no download): its layers run through our function, and
    the gradients equal those of the same model without checkpointing."""
    import transformers  # a dev extra: `make test` installs it

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(transformers.GPT2LMHeadModel(config).train())
    ac = ActivationCheckpointing(plan=ON)
    assert install(models[1], ac) > 0
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    for model in models:
        model(input_ids=ids, labels=ids).loss.backward()
    assert ac.calls == config.n_layer
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_a_model_without_the_hook_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ConfigError, match="activation_checkpointing.enabled.*no checkpoint hook"):
        install(model, ActivationCheckpointing(plan=ON))
    assert install(model, ActivationCheckpointing(plan=ActivationCheckpointingPlan())) == 0


def test_checkpointing_off_is_a_plain_call():
    calls = []
    ac = ActivationCheckpointing(plan=ActivationCheckpointingPlan())
    assert ac(lambda x: calls.append(x) or x + 1, 1) == 2 and calls == [1] and ac.calls == 0
