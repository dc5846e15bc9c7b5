"""Rank workers of the offload tests (run through rt_cases.run_jobs as "rt_offload_jobs:NAME")."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch.distributed as dist

from zeroplan.runtime import initialize

from rt_cases import build, case_plan
from rt_jobs import _train


def _swap_dirs(engine) -> list[Path]:
    out = []
    state = getattr(engine.optimizer, "state", None)
    if state is not None:
        out.append(state.folder.path)
    store = getattr(engine.zero, "param_store", None)
    if hasattr(store, "folder"):
        out.append(store.folder.path)
    return out


def swap_lifecycle(*, case: dict, root: str) -> dict | None:
    """Where the swap files are while training, how stage 3 got its partitions, and what is
    left under the NVMe path once every rank has closed its engine."""
    engine = initialize(build(case["model"]), plan=case_plan(case))
    dirs = _swap_dirs(engine)
    during = {str(d.relative_to(root)): {"mode": stat.S_IMODE(d.stat().st_mode),
                                         "files": {f.name: f.stat().st_size for f in d.iterdir()}} for d in dirs}
    _train(engine, case, range(3))
    reads = dict(getattr(engine.zero.param_store, "reads", {}))
    numel = engine.zero.layout.numel
    engine.close()
    closed = [d.exists() for d in dirs]
    dist.barrier()
    left = sorted(os.listdir(root))
    return {"during": during, "reads": reads, "numel": numel, "closed": closed, "left": left} \
        if dist.get_rank() == 0 else None


def checkpoint_across(*, save_case: dict, load_case: dict, directory: str) -> dict | None:
    """Train 2 steps under `save_case`, save, 2 more; a fresh engine under `load_case` loads the
    checkpoint and trains the same 2 steps: the parameters and losses must be the same."""
    first = initialize(build(save_case["model"]), plan=case_plan(save_case))
    _train(first, save_case, range(2))
    first.save_checkpoint(directory)
    straight = _train(first, save_case, range(2, 4))
    want = first.full_state_dict()
    first.close()
    second = initialize(build(load_case["model"]), plan=case_plan(load_case))
    second.load_checkpoint(directory)
    resumed = _train(second, load_case, range(2, 4))
    got = second.full_state_dict()
    second.close()
    if dist.get_rank():
        return None
    diff = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    return {"diff": diff, "losses": (straight, resumed)}
