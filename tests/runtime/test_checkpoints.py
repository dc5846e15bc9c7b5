"""Checkpoints that verify and reshard: real processes, real files, three spawns in all.

One dp 2 x ZeRO-2 run of the test GPT saves at step 2 and trains on to step 4. Then:
  - world 2: the checkpoint resumes at ZeRO-3 and at ZeRO-1 with the optimizer on the host;
    altered copies of it (a flipped bit, swapped ranks, mixed steps, NaN and fp16 state,
    damaged records, an unpickling state file, a `latest` or a tag that climbs out) are each
    refused by name on both ranks; a shard damaged on one rank ends the load on both within
    seconds; another model and another optimizer are refused;
  - world 4: it resumes at dp 2 x tp 2 (ZeRO-2) and dp 2 x pp 2 (ZeRO-1), each saving again;
  - world 1: the original, the tp and the pp checkpoints resume in one process (ZeRO-0, ZeRO-3,
    ZeRO-1 with the optimizer on the host);
  - no process group: the checkpoints load into a plain GPT, and `zeroplan export` writes
    weights a plain GPT loads, and for a Hugging Face GPT-2 a directory from_pretrained loads.
Right after each load the whole model equals the saved run's at step 2 exactly (a reshard only
copies). After two more steps it equals the uninterrupted run's step 4 within rt_tolerance's
bounds: 1e-5 per fp32 element (only the order of the gradient sums differs between layouts),
the key bias within Adam's noise drift.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rt_cases import build, case_plan
from rt_ckpt_jobs import BAD_TAGS, HOST_OPTIMIZER, LATEST, SAVED, TAG, TAMPER
from rt_cases import run_jobs
from rt_harness import run_distributed
from rt_spawn import job_result
from rt_tolerance import compare
from zeroplan.runtime import checkpoint
from zeroplan.runtime.checkpoint_source import Checkpoint
from zeroplan.runtime.reshard import consolidate

pytestmark = pytest.mark.numerics

LAYOUTS = {  # id -> (world, case, source checkpoint, save again as)
    "z3-dp2": (2, dict(SAVED, stage=3), "ckpt", None),
    "z1-dp2-host-optimizer": (2, dict(SAVED, stage=1, offload=HOST_OPTIMIZER), "ckpt", None),
    "z2-dp2-tp2": (4, dict(model="gpt", stage=2, dp=2, tp=2, accum=1), "ckpt", "ckpt_tp"),
    "z1-dp2-pp2": (4, dict(model="gpt", stage=1, dp=2, pp=2, accum=1), "ckpt", "ckpt_pp"),
    "z0-world1": (1, dict(SAVED, stage=0, world=1), "ckpt", None),
    "z3-world1-from-tp": (1, dict(SAVED, stage=3, world=1), "ckpt_tp", None),
    "z1-world1-host-optimizer-from-pp": (1, dict(SAVED, stage=1, world=1, offload=HOST_OPTIMIZER), "ckpt_pp", None),
}
EXPECTED = {  # altered checkpoint -> what every rank's error must say
    "bit-flip-rank1": ["rank 1", "rank00001.safetensors", "modified or damaged after the save"],
    "truncated-rank0": ["rank 0", "rank00000.safetensors", "is 1000 bytes"],
    "swapped-ranks": ["rank00000.manifest.json", "was written by rank 1", "swapped or copied"],
    "swapped-shards": ["rank00000.safetensors", "modified or damaged"],
    "mixed-steps": ["rank 1", "rank00001.manifest.json", "is from step 1", "meta.json is from step 2"],
    "nan-master": ["rank 1", "rank00001.safetensors", "master of", "1 non-finite value"],
    "inf-moment": ["rank00000.safetensors", "optim.exp_avg_sq of", "non-finite"],
    "fp16-master": ["rank00000.safetensors", "'master' is float16", "the layout needs float32"],
    "meta-bit-flip": ["meta.json", "damaged"],
    "manifest-bit-flip": ["rank00001.manifest.json", "damaged"],
    "manifest-missing": ["rank00001.manifest.json", "cannot be read"],
    "state-bit-flip": ["rank00000.state.pt", "modified or damaged"],
    "unpickling-state": ["rank00000.state.pt", "weights_only"],
    "old-format": ["meta.json", "format 1"],
    "symlink-outside": ["leads outside the checkpoint directory"],
    **{case: ["/latest:", f"given: '{value}'"] for case, value in LATEST.items()},
}


def spawn_jobs(world: int, jobs: list) -> dict:
    """rt_spawn's, with room for a loaded machine: the bound catches a hang, not slowness."""
    return run_distributed(run_jobs, world, jobs, timeout=600)[0]


@functools.lru_cache(maxsize=None)
def _run(root: str) -> dict:
    def jobs(world: int) -> list:
        return [(f"resume-{name}", "rt_ckpt_jobs:resume", {"root": root, "case": case, "source": source,
                                                            "save_as": save_as})
                for name, (w, case, source, save_as) in LAYOUTS.items() if w == world]

    out = spawn_jobs(2, [("reference", "rt_ckpt_jobs:save_reference", {"root": root}), *jobs(2),
                         ("hostile", "rt_ckpt_jobs:hostile", {"root": root}),
                         ("fresh", "rt_ckpt_jobs:start_fresh", {"root": root}),
                         ("others", "rt_ckpt_jobs:other_models", {"root": root})])
    out.update(spawn_jobs(4, jobs(4)))
    out.update(spawn_jobs(1, [*jobs(1), ("hf", "rt_ckpt_jobs:save_hf", {"root": root})]))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def results(root) -> dict:
    return _run(str(root))


def _differing(got: dict, want: dict) -> list[str]:
    assert sorted(got) == sorted(want)
    return [k for k in want if not torch.equal(got[k], want[k])]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_checkpoint_resumes_in_another_layout(results, layout):
    reference = job_result(results, "reference")
    got = job_result(results, f"resume-{layout}")
    assert got["steps"] == 2 and got["client"] == {"epoch": 1}
    assert not _differing(got["at_load"], reference["at2"]), "the loaded model differs from the saved one"
    failures = compare(got["at4"], reference["at4"], model=build("gpt"), plan=case_plan(SAVED), steps=4)
    assert not failures, "\n".join(failures[:5])


def test_a_load_that_keeps_its_layout_reads_only_its_own_files(results):
    for message, _ in job_result(results, "hostile")["bit-flip-rank1"]:  # rank 1's shard is damaged
        assert "rank 1: " in message and "rank 0" not in message and "ranks 0, 1" not in message, message


@pytest.mark.parametrize("case", EXPECTED)
def test_an_altered_checkpoint_is_refused_by_name_on_every_rank(results, case):
    outcomes = job_result(results, "hostile")[case]
    for rank, (message, seconds) in enumerate(outcomes):
        assert message.startswith("CheckpointError"), f"rank {rank}: {message}"
        for part in EXPECTED[case]:
            assert part in message, f"rank {rank} does not say {part!r}:\n{message}"
        assert seconds < 10


def test_every_altered_checkpoint_is_covered():
    assert set(EXPECTED) == set(TAMPER) | set(LATEST)


@pytest.mark.parametrize("i", range(len(BAD_TAGS)), ids=[repr(t)[:20] for t in BAD_TAGS])
def test_a_tag_that_is_not_one_plain_path_component_is_refused(results, i):
    for rank, (message, _) in enumerate(job_result(results, "hostile")[f"tag-{i}"]):
        assert message.startswith("CheckpointError") and "tag" in message, f"rank {rank}: {message}"


def test_refused_saves_and_loads_write_nothing_and_change_nothing(results, root):
    hostile = job_result(results, "hostile")
    before, after, parent = hostile["listing"]
    assert set(after) - set(before) <= {"tags"}
    assert not (root / "tags" / "d" / "latest").exists()
    assert "x" not in parent and not (root.parent.parent / "x").exists()
    assert hostile["after-refusals"] == 0


def test_a_failure_on_one_rank_ends_the_load_on_both_within_seconds(results):
    outcomes = job_result(results, "fresh")
    for rank, (fresh, message, seconds) in enumerate(outcomes):
        assert fresh, f"rank {rank} loaded while the other could not"
        assert "rank 1: " in message and "rank00001.safetensors" in message, message
        assert seconds < 10, f"rank {rank} took {seconds:.1f}s"


def test_another_model_or_optimizer_is_refused(results):
    others = job_result(results, "others")
    for message, _ in others["other-shape"]:
        assert "'wte.weight' has shape [97, 32]; this model's is [101, 32]" in message, message
    for message, _ in others["other-optimizer"]:
        assert "optimizer state ['exp_avg', 'exp_avg_sq', 'step']" in message and "momentum_buffer" in message, message


@pytest.mark.parametrize("source", ["ckpt", "ckpt_tp", "ckpt_pp"])
def test_any_checkpoint_loads_into_a_plain_model(results, root, source):
    want = job_result(results, "reference")["at2"]
    state = consolidate(Checkpoint(checkpoint.resolve(root / source, None)))
    model = build("gpt")
    model.load_state_dict(state)
    assert not _differing(model.state_dict(), want)


def _zeroplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroplan", *args], capture_output=True, text=True, timeout=120)


def test_export_writes_weights_a_plain_model_loads(results, root, tmp_path):
    want = job_result(results, "reference")["at2"]
    run = _zeroplan("export", str(root / "ckpt_tp"), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    model = build("gpt")
    model.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"))
    assert not _differing(model.state_dict(), want)


def test_export_of_a_hugging_face_model_loads_with_from_pretrained(results, root, tmp_path):
    import transformers

    want = job_result(results, "hf")
    run = _zeroplan("export", str(root / "ckpt_hf"), "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert sorted(reloaded) == sorted(want)
    assert not _differing(reloaded, want)


def test_export_of_a_damaged_checkpoint_exits_2_naming_the_file(results, root, tmp_path):
    run = _zeroplan("export", str(root / "hostile" / "bit-flip-rank1"), "--tag", TAG, "--out", str(tmp_path))
    assert run.returncode == 2
    assert "rank00001.safetensors" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("args,says", [(["--tag", "../x"], "a tag is one path component"),
                                       ([], "latest: no checkpoint in"),
                                       (["--dtype", "fp8"], "--dtype: is none of fp32, bf16, fp16")])
def test_export_user_errors_exit_2_without_a_traceback(tmp_path, args, says):
    (tmp_path / "ckpt").mkdir()
    run = _zeroplan("export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), *args)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
