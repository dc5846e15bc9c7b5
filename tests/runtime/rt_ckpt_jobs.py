"""Rank workers of the checkpoint tests: a dp 2 x ZeRO-2 run saved at step 2 and resumed in
other layouts, and checkpoints altered the ways a file system, a copy or a hand can alter them
(run through rt_cases.run_jobs as "rt_ckpt_jobs:<function>")."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from zeroplan.runtime import initialize
from zeroplan.runtime.checkpoint import file_name, sha256_file
from zeroplan.runtime.checkpoint_records import seal
from zeroplan.schemas import ModelSpec
from zeroplan.schemas.plan import OffloadPlan, OffloadTarget, OptimizerPlan
from zeroplan.runtime.models import GPT

from rt_cases import build, case_plan, loss_of, micro_batch
from rt_pipeline import _engine as pp_engine, data_iter
from tp_jobs import _engine as tp_engine, batch_of

SAVED = dict(model="gpt", stage=2, world=2, accum=1)
"""The run every checkpoint here comes from: dp 2, ZeRO-2, saved at step 2 of 4."""
TAG = "global_step2"


def _gather(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _train(engine, case: dict, steps: range) -> None:
    for step in steps:
        for k in range(case["accum"]):
            engine.backward(loss_of(engine(**micro_batch(case, step, engine.groups.dp_rank, k))))
            engine.step()


# -- the saved run ---------------------------------------------------------------------------------
def save_reference(*, root: str) -> dict | None:
    """dp 2 x ZeRO-2: a checkpoint at step 1 ("early") and at step 2 ("ckpt"), then on to step 4.
    Rank 0 returns the weights at steps 2 and 4 and writes them beside the checkpoints."""
    engine = initialize(build("gpt"), plan=case_plan(SAVED))
    _train(engine, SAVED, range(1))
    engine.save_checkpoint(os.path.join(root, "early"), tag=TAG)
    _train(engine, SAVED, range(1, 2))
    engine.save_checkpoint(os.path.join(root, "ckpt"), client_state={"epoch": 1})
    at2 = engine.full_state_dict()
    _train(engine, SAVED, range(2, 4))
    at4 = engine.full_state_dict()
    engine.close()
    if dist.get_rank():
        return None
    torch.save({"at2": at2, "at4": at4}, os.path.join(root, "reference.pt"))
    return {"at2": at2, "at4": at4}


def resume(*, root: str, case: dict, source: str = "ckpt", save_as: str | None = None) -> dict | None:
    """Load the checkpoint in `case`'s layout, optionally save it again there, train steps 2-3;
    rank 0 returns the whole model at step 4 and what loading restored."""
    kind = "pp" if case.get("pp", 1) > 1 else "tp" if case.get("tp", 1) > 1 else "dp"
    engine = pp_engine(case) if kind == "pp" else tp_engine(case) if kind == "tp" else \
        initialize(build("gpt"), plan=case_plan(case))
    client = engine.load_checkpoint(os.path.join(root, source))
    at_load = engine.full_state_dict()
    if save_as:
        engine.save_checkpoint(os.path.join(root, save_as), client_state=client)
    steps = engine.global_steps
    if kind == "pp":
        data = data_iter(case, dp_rank=engine.groups.dp_rank, start=steps)
        for _ in range(steps, 4):
            engine.train_batch(data)
    elif kind == "tp":
        for step in range(steps, 4):
            engine.backward(engine(**batch_of(case, step, engine.groups.dp_rank, 0)))
            engine.step()
    else:
        _train(engine, case, range(steps, 4))
    full = engine.full_state_dict()
    engine.close()
    if dist.get_rank():
        return None
    return {"at_load": at_load, "at4": full, "steps": steps, "client": client}


# -- altered checkpoints ---------------------------------------------------------------------------
def reseal(tag_dir: Path, rank: int, *, tensors: dict | None = None, state: bytes | None = None) -> None:
    """Replace rank's tensors or state file and bring its manifest and meta.json in line, as a
    tool that knows the format would: only the checks behind the hashes can refuse it then."""
    if tensors is not None:
        save_file(tensors, str(tag_dir / file_name(rank, "safetensors")))
    if state is not None:
        (tag_dir / file_name(rank, "state.pt")).write_bytes(state)
    manifest_path = tag_dir / file_name(rank, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("sha256")
    for name in manifest["files"]:
        manifest["files"][name] = sha256_file(tag_dir / name).model_dump()
    if tensors is not None:
        manifest["tensors"] = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}
    manifest_path.write_text(seal(manifest))
    meta = json.loads((tag_dir / "meta.json").read_text())
    meta.pop("sha256")
    meta["manifests"][rank] = sha256_file(manifest_path).sha256
    (tag_dir / "meta.json").write_text(seal(meta))


def _flip_bit(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _swap(d: Path, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        a, b = d / file_name(0, kind), d / file_name(1, kind)
        tmp = d / "swap.tmp"
        os.replace(a, tmp)
        os.replace(b, a)
        os.replace(tmp, b)


def _with_tensor(d: Path, rank: int, key: str, change) -> None:
    tensors = load_file(str(d / file_name(rank, "safetensors")))
    tensors[key] = change(tensors[key].clone())
    reseal(d, rank, tensors=tensors)


def _poke(t: torch.Tensor, value: float) -> torch.Tensor:
    t[3] = value
    return t


class Evil:
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def _evil_state(d: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save({"client_state": Evil()}, buf)
    reseal(d, 0, state=buf.getvalue())


def _old_format(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("sha256")
    meta["format"] = 1
    (d / "meta.json").write_text(seal(meta))


def _outside_link(d: Path) -> None:
    outside = d.parent.parent / "elsewhere"
    shutil.copytree(d, outside / TAG, dirs_exist_ok=True)
    shutil.rmtree(d)
    os.symlink(outside / TAG, d)


TAMPER = {
    "bit-flip-rank1": lambda d: _flip_bit(d / file_name(1, "safetensors")),
    "truncated-rank0": lambda d: os.truncate(d / file_name(0, "safetensors"), 1000),
    "swapped-ranks": lambda d: _swap(d, ("safetensors", "state.pt", "manifest.json")),
    "swapped-shards": lambda d: _swap(d, ("safetensors",)),
    "mixed-steps": lambda d: [shutil.copy(d.parents[2] / "early" / TAG / file_name(1, k), d / file_name(1, k))
                              for k in ("safetensors", "state.pt", "manifest.json")],
    "nan-master": lambda d: _with_tensor(d, 1, "master", lambda t: _poke(t, float("nan"))),
    "inf-moment": lambda d: _with_tensor(d, 0, "optim.exp_avg_sq", lambda t: _poke(t, float("inf"))),
    "fp16-master": lambda d: _with_tensor(d, 0, "master", lambda t: t.half()),
    "meta-bit-flip": lambda d: _flip_bit(d / "meta.json", 0.3),
    "manifest-bit-flip": lambda d: _flip_bit(d / file_name(1, "manifest.json"), 0.3),
    "manifest-missing": lambda d: os.remove(d / file_name(1, "manifest.json")),
    "state-bit-flip": lambda d: _flip_bit(d / file_name(0, "state.pt"), 0.9),
    "unpickling-state": _evil_state,
    "old-format": _old_format,
    "symlink-outside": _outside_link,
}
LATEST = {"latest-parent": "../x", "latest-absolute": "/etc", "latest-empty": "", "latest-nested": "a/b",
          "latest-latest": "latest"}
BAD_TAGS = ["./../../../x", "latest", "LATEST", "", "a/b", "..", ".hidden", "x" * 200, "tab\tag"]


def _attempt(fn) -> tuple[str, float]:
    started = time.monotonic()
    try:
        fn()
        return "no error", time.monotonic() - started
    except Exception as e:  # the test reads the message
        return f"{type(e).__name__}: {e}", time.monotonic() - started


def hostile(*, root: str) -> dict | None:
    """Every altered checkpoint, each loaded by both ranks of a dp 2 x ZeRO-2 engine (one engine:
    a refused load changes nothing); every bad tag saved. Rank 0 returns, per case, each rank's
    error and seconds."""
    rank = dist.get_rank()
    good = Path(root) / "ckpt"
    engine = initialize(build("gpt"), plan=case_plan(SAVED))
    out = {}
    for case, tamper in {**TAMPER, **{k: None for k in LATEST}}.items():
        d = Path(root) / "hostile" / case
        if rank == 0:
            shutil.copytree(good, d)
            if tamper is not None:
                tamper(d / TAG)
            else:
                (d / "latest").write_text(LATEST[case] + "\n")
        dist.barrier()
        out[case] = _gather(_attempt(lambda: engine.load_checkpoint(d)))
    before = sorted(os.listdir(root))
    for i, tag in enumerate(BAD_TAGS):
        out[f"tag-{i}"] = _gather(_attempt(lambda: engine.save_checkpoint(os.path.join(root, "tags", "d"), tag=tag)))
    out["listing"] = (before, sorted(os.listdir(root)), sorted(os.listdir(Path(root).parent)))
    out["after-refusals"] = engine.global_steps  # nothing was loaded
    engine.close()
    return out if rank == 0 else None


def start_fresh(*, root: str) -> dict | None:
    """`try: load / except: start fresh` when only rank 1's shard is damaged: both ranks must take
    the except branch, then train a step together (a deadlock would time the test out)."""
    d = Path(root) / "one-rank" / TAG
    if dist.get_rank() == 0:
        shutil.copytree(Path(root) / "ckpt", d.parent)
        _flip_bit(d / file_name(1, "safetensors"))
    dist.barrier()
    engine = initialize(build("gpt"), plan=case_plan(SAVED))
    outcome = _attempt(lambda: engine.load_checkpoint(d.parent))
    fresh = outcome[0] != "no error"
    _train(engine, SAVED, range(1))
    engine.close()
    both = _gather((fresh, *outcome))
    return both if dist.get_rank() == 0 else None


def other_models(*, root: str) -> dict | None:
    """The checkpoint loaded into a model of another shape and into a run with another optimizer."""
    out = {}
    wide = GPT(ModelSpec(name="wide", layers=2, hidden=32, heads=2, ffn=128, vocab=101, seq_len=8))
    sgd = OptimizerPlan(type="SGD", lr=0.1, momentum=0.9)
    for name, model, plan in (("other-shape", wide, case_plan(SAVED)),
                              ("other-optimizer", build("gpt"), case_plan(dict(SAVED, optimizer=sgd)))):
        engine = initialize(model, plan=plan)
        out[name] = _gather(_attempt(lambda: engine.load_checkpoint(os.path.join(root, "ckpt"))))
        engine.close()
    return out if dist.get_rank() == 0 else None


HOST_OPTIMIZER = OffloadPlan(optimizer=OffloadTarget(device="cpu"))
"""The optimizer offloaded to the host, for the resumed layouts that change offload."""


def save_hf(*, root: str) -> dict | None:
    """A small Hugging Face GPT-2 trained one step at ZeRO-3 and saved; rank 0 returns its
    whole model (fp32) for the export test."""
    from rt_external_jobs import batch, build_hf, plan_of

    case = {"model": "gpt2", "stage": 3, "world": dist.get_world_size()}
    engine = initialize(build_hf("gpt2"), plan=plan_of(case))
    engine.backward(engine(**batch(case, 0, dist.get_rank())).loss)
    engine.step()
    engine.save_checkpoint(os.path.join(root, "ckpt_hf"))
    full = engine.consolidated_state_dict()
    engine.close()
    return full if dist.get_rank() == 0 else None
