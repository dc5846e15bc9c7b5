"""Offload of the optimizer (cpu, nvme) and of ZeRO-3 parameters (cpu, nvme).

Offload moves state, never arithmetic: the update is element-wise, so running it on the host,
or tile by tile over swap files, must give the parameters of the same plan without offload.
Held to 1e-6 (fp32); in practice they are bit-identical. Each run does 5 AdamW steps with
clipping and a warm-up/decay schedule, with the kernel the compiler picks for offload
(cpu_adam; torch_foreach where no compiler can build it) and tiles of 5120 elements, so every
shard is swapped in several tiles. One spawn per world size runs every case.
"""

from __future__ import annotations

import functools
import os

import pytest

from rt_cases import max_diff, mismatches, reference_global
from rt_spawn import job_result, spawn_jobs
from zeroplan.runtime.kernels.loader import CPU_ADAM
from zeroplan.runtime.rundir import OWNER_FILE
from zeroplan.schemas.plan import OffloadPlan, OffloadTarget

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)

TOL = 1e-6
KERNEL = "cpu_adam" if CPU_ADAM.load() is not None else "torch_foreach"
COMBOS = [(1, "cpu", "none"), (1, "nvme", "none"), (2, "cpu", "none"), (2, "nvme", "none"),
          (3, "cpu", "none"), (3, "nvme", "none"), (3, "none", "cpu"), (3, "cpu", "cpu"), (3, "nvme", "nvme")]


def _offload(root: str, optimizer: str, param: str) -> OffloadPlan:
    def target(device: str, count: int) -> OffloadTarget:
        return OffloadTarget(device=device, nvme_path=root if device == "nvme" else None, buffer_count=count)
    return OffloadPlan(optimizer=target(optimizer, 2), param=target(param, 3))


def case(root: str, stage: int, world: int, optimizer: str = "none", param: str = "none", **extra) -> dict:
    tags = "".join(f"-{k}={v}" for k, v in sorted(extra.items()) if k != "model")
    out = dict(model="gpt", stage=stage, world=world, accum=1, kernel=KERNEL, sub_group=5000,
               offload=_offload(root, optimizer, param))
    out.update(extra)
    out["id"] = f"{out['model']}-z{stage}-w{world}-opt={optimizer}-param={param}{tags}"
    return out


def _equivalence_cases(root: str, world: int) -> list[dict]:
    cases = [case(root, s, world) for s in (1, 2, 3)]
    combos = COMBOS if world == 2 else [(s, o, p) for s, o, p in COMBOS if o == "nvme" or p == "cpu"]
    cases += [case(root, s, world, o, p) for s, o, p in combos]
    if world == 2:
        cases += [case(root, 3, 2, accum=3), case(root, 3, 2, "nvme", "nvme", accum=3),
                  case(root, 2, 2, dtype="bf16"), case(root, 2, 2, "nvme", dtype="bf16"),
                  case(root, 3, 2, dtype="bf16"), case(root, 3, 2, "nvme", "nvme", dtype="bf16"),
                  case(root, 3, 2, model="zoo", persistence=10), case(root, 3, 2, "nvme", "nvme", model="zoo",
                                                                       persistence=10)]
    return cases


def _baseline(c: dict) -> str:
    """The id of the same case without offload."""
    return c["id"].replace(f"opt={c['offload'].optimizer.device}", "opt=none").replace(
        f"param={c['offload'].param.device}", "param=none")


@functools.lru_cache(maxsize=None)
def _spawned(root: str, world: int) -> dict:
    os.makedirs(os.path.join(root, "nvme"), exist_ok=True)
    nvme = os.path.join(root, "nvme")
    jobs = [(c["id"], "train_case", {"case": c}) for c in _equivalence_cases(nvme, world)]
    if world == 2:
        life = os.path.join(root, "life")
        os.makedirs(life, exist_ok=True)
        jobs.append(("lifecycle", "rt_offload_jobs:swap_lifecycle",
                     {"case": case(life, 3, 2, "nvme", "nvme", accum=1), "root": life}))
        ckpt = case(nvme, 3, 2, "nvme", "nvme", accum=3)
        jobs.append(("ckpt-nvme", "checkpoint_roundtrip", {"case": ckpt, "directory": os.path.join(root, "c1")}))
        jobs.append(("ckpt-nvme-z2", "checkpoint_roundtrip",
                     {"case": case(nvme, 2, 2, "nvme", dtype="bf16"), "directory": os.path.join(root, "c2")}))
        jobs.append(("ckpt-across", "rt_offload_jobs:checkpoint_across",
                     {"save_case": case(nvme, 2, 2, "nvme"), "load_case": case(nvme, 2, 2),
                      "directory": os.path.join(root, "c3")}))
    return spawn_jobs(world, jobs)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("offload"))


ALL = [(w, c) for w in (1, 2) for c in _equivalence_cases("ROOT", w) if c["id"] != _baseline(c)]


@pytest.mark.parametrize("world, c", ALL, ids=[c["id"] for _, c in ALL])
def test_offload_gives_the_parameters_of_no_offload(root, world, c):
    results = _spawned(root, world)
    got, want = job_result(results, c["id"]), job_result(results, _baseline(c))
    diff, where = max_diff(got["params"], want["params"], model=c["model"])
    assert diff <= TOL, f"{c['id']}: max |diff| {diff:.3g} at {where}"
    assert got["losses"] == want["losses"]
    assert got["published_gap"] == 0.0


@pytest.mark.parametrize("world", (1, 2))
def test_baseline_with_the_offload_kernel_matches_torch(root, world, one_thread):
    c = case("ROOT", 2, world)
    got = job_result(_spawned(root, world), c["id"])
    failures = mismatches(got["params"], reference_global(c), case=c)
    assert not failures, "; ".join(failures)


def test_swap_files_live_in_a_private_run_directory_removed_at_close(root):
    got = job_result(_spawned(root, 2), "lifecycle")
    assert len(got["during"]) == 2, got["during"]  # optimizer and parameter directories of rank 0
    for name, info in got["during"].items():
        assert name.startswith("zeroplan-") and info["mode"] == 0o700
        assert info["files"], f"{name} holds no swap file"
    optimizer_files = next(i["files"] for n, i in got["during"].items() if "optimizer" in n)
    # the owner marker lets the next run or `zeroplan clean` remove a dead run's directory (rundir.py)
    assert OWNER_FILE in optimizer_files
    swap = {name: size for name, size in optimizer_files.items() if name != OWNER_FILE}
    assert sorted(swap) == ["rank00000.exp_avg.swp", "rank00000.exp_avg_sq.swp", "rank00000.master.swp"]
    assert all(size >= got["numel"] * 4 for size in swap.values())
    assert got["closed"] == [False, False] and got["left"] == [], "swap directories survived close()"
    reads = got["reads"]
    assert reads["prefetched"] + reads["waited"] > 0, f"no partition was read ahead of its gather: {reads}"


@pytest.mark.parametrize("job", ["ckpt-nvme", "ckpt-nvme-z2"])
def test_nvme_checkpoint_resumes_like_an_uninterrupted_run(root, job):
    got = job_result(_spawned(root, 2), job)
    assert got["steps"] == 4 and got["diff"] == 0.0
    straight, resumed = got["losses"]
    assert straight == resumed and got["rng_equal"]


def test_checkpoint_saved_with_nvme_offload_loads_without_offload(root):
    got = job_result(_spawned(root, 2), "ckpt-across")
    assert got["diff"] == 0.0
    assert got["losses"][0] == got["losses"][1]
