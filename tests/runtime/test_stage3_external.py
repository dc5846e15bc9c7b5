"""ZeRO-3 never computes with a parameter it has released.

A parent's forward that reads a child's weight (an LM head as F.linear on the embedding
weight), a module that applies its sibling's weight, and a loss that reads a weight inside
`zeroplan.gathered` all train at ZeRO-3 to the single-process result (rt_tolerance); so do
the same with the reads registered ahead. Reading a released parameter anywhere else raises
ParameterNotGathered naming it, never NaN. `gathered(modifier_rank=0)` shows the whole weight
on every rank and keeps rank 0's write in every shard, the fp32 master (in bf16 too, without
rounding the elements it did not write) and the next steps. A Hugging Face
GPT-2 and Llama trained at ZeRO-3 (and GPT-2 at stage 1) save with `engine.save_pretrained`
what the model's own save_pretrained writes, and reload equal to the consolidated state dict
and to a single-process run. One spawn of 2 ranks.
"""

from __future__ import annotations

import json

import pytest
import torch

from rt_external_jobs import build, plan_of, reference
from rt_spawn import job_result, spawn_jobs
from rt_tolerance import compare

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)


def _case(name, *, model="children", stage=3, steps=4, **extra):
    return dict(id=name, model=model, stage=stage, world=2, steps=steps, **extra)


TRAINED = [_case("parent-reads-z3"), _case("registered-z3", register="before"),
           _case("registered-after-z3", register="after"), _case("loss-reads-z3", head_in_loss=True),
           _case("modify-z3", modify_after=1), _case("modify-z1", stage=1, modify_after=1)]
MODIFIED_BF16 = _case("modify-z3-bf16", modify_after=1, steps=2, dtype="bf16")
"""Its fp32 master bits outside the written row must survive the write (not checked for numerics)."""
HF = [_case("gpt2-z3", model="gpt2", steps=2), _case("llama-z3", model="llama", steps=2),
      _case("gpt2-z1", model="gpt2", stage=1, steps=2)]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    for case in HF:
        case["save"], case["module_save"] = str(root / case["id"] / "saved"), str(root / case["id"] / "module")
    existing = root / "gpt2-z1" / "saved"  # saved into a directory that holds other files
    existing.mkdir(parents=True)
    (existing / "tokenizer.json").write_text("{}")
    (existing / "model-00001-of-00002.safetensors").write_text("a stale shard")
    cases = TRAINED + [MODIFIED_BF16] + HF
    return spawn_jobs(2, [(c["id"], "rt_external_jobs:train", {"case": c}) for c in cases])


@pytest.mark.parametrize("case", TRAINED + HF, ids=[c["id"] for c in TRAINED + HF])
def test_trains_to_the_single_process_result(case, spawned, one_thread):
    got = job_result(spawned, case["id"])
    failures = compare(got["params"], reference(case), model=build(case), plan=plan_of(case), steps=case["steps"])
    assert not failures, f"{case['id']}: " + "; ".join(failures)


@pytest.mark.parametrize("case", [c for c in TRAINED + HF if c["stage"] == 3], ids=lambda c: c["id"])
def test_a_released_parameter_read_outside_a_gather_names_itself(case, spawned):
    for rank, checks in enumerate(job_result(spawned, case["id"])["ranks"]):
        errors = checks["errors"]
        assert errors and set(errors) >= {"state_dict"}
        for read, message in errors.items():
            assert message.startswith("ParameterNotGathered: ZeRO-3 parameter '"), f"rank {rank}, {read}: {message}"
            assert "zeroplan.gathered" in message and "register_external_parameter" in message
            if "." in read:  # the read names the parameter it touched, fully qualified
                assert f"'{read}'" in message, f"rank {rank}: {message}"


MODIFIED = [c for c in TRAINED if "modify_after" in c] + [MODIFIED_BF16]


@pytest.mark.parametrize("case", MODIFIED, ids=[c["id"] for c in MODIFIED])
def test_gathered_shows_the_whole_weight_and_keeps_the_modifier_ranks_write(case, spawned):
    for rank, checks in enumerate(job_result(spawned, case["id"])["ranks"]):
        assert checks["gathered_is_whole"], f"rank {rank}: gathered() is not the consolidated weight"
        assert checks["entered_unchanged"], f"rank {rank}"
        assert checks["sees_rank0_write"], f"rank {rank} does not read rank 0's write (rank 1 wrote 7.0)"
        assert checks["consolidated_has_it"], f"rank {rank}: the shards did not take the write"
        assert checks["master_took_row_0"], f"rank {rank}: the fp32 master did not take the write"
        assert checks["master_kept_the_rest"], f"rank {rank}: the write changed master elements it did not touch"


@pytest.mark.parametrize("case", HF, ids=[c["id"] for c in HF])
def test_save_pretrained_writes_what_hugging_face_writes(case, spawned, tmp_path):
    import transformers
    from safetensors import safe_open

    got = job_result(spawned, case["id"])
    saved = got["ranks"][0]["saved"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved).state_dict()
    for name, value in reloaded.items():
        assert torch.equal(value, got["params"][name]), f"{name}: reloaded != consolidated_state_dict()"
    model = build(case)
    model.save_pretrained(tmp_path)
    keys = {}
    for folder in (tmp_path, saved):
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            keys[folder] = set(f.keys())
    assert keys[tmp_path] == keys[saved]
    assert ("lm_head.weight" in keys[saved]) == (case["model"] == "llama"), "tied lm_head dropped, untied kept"
    config = json.loads((tmp_path / "config.json").read_text())
    assert json.loads(open(f"{saved}/config.json").read())["architectures"] == config["architectures"]


def test_save_pretrained_replaces_weights_and_keeps_other_files(spawned):
    from pathlib import Path

    saved = Path(job_result(spawned, "gpt2-z1")["ranks"][0]["saved"])
    names = {p.name for p in saved.iterdir()}
    assert "tokenizer.json" in names and "model-00001-of-00002.safetensors" not in names
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == [], "a temp directory is left"
