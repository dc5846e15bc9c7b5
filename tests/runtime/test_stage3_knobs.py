"""DeepSpeed's stage-3 knobs act: `stage3_max_reuse_distance` keeps a module that runs again
soon gathered, `stage3_max_live_parameters` stops prefetching past its cap, and
`stage3_model_persistence_threshold` caps the elements kept whole. None of them changes the
arithmetic: every case trains to the single-process result (rt_tolerance). One 2-rank spawn."""

from __future__ import annotations

import functools

import pytest

from rt_cases import mismatches, reference_global, reference_micro
from rt_spawn import job_result, spawn_jobs
from zeroplan.compiler.shapes import persistent_tensors

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)


def _case(name, model="gpt", **knobs):
    return dict(id=name, model=model, stage=3, world=2, accum=3, persistence=10 if model == "zoo" else 40, **knobs)


CASES = [_case("zoo-reuse", "zoo", max_reuse=10**9), _case("zoo-no-reuse", "zoo", max_reuse=0),
         _case("gpt-prefetch"), _case("gpt-live-1", max_live=1),
         _case("gpt-persist-all"), _case("gpt-persist-cap-64", model_persistence=64)]


@functools.lru_cache(maxsize=None)
def _spawned() -> dict:
    return spawn_jobs(2, [(c["id"], "train_case", {"case": c}) for c in CASES])


def _got(name: str) -> dict:
    return job_result(_spawned(), name)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_the_knobs_leave_the_arithmetic_alone(case, one_thread):
    want = reference_micro(case) if case["model"] == "zoo" else reference_global(dict(case, world=1, accum=1))
    failures = mismatches(_got(case["id"])["params"], want, case=case)
    assert not failures, "; ".join(failures)


def test_a_module_run_again_soon_stays_gathered():
    """The zoo runs its `shared` layer twice per forward: with reuse it is gathered once."""
    reuse, no_reuse = _got("zoo-reuse")["comms"], _got("zoo-no-reuse")["comms"]
    gathers = lambda c: c["all_gather_into_tensor"]["count"]  # noqa: E731
    assert gathers(reuse) == gathers(no_reuse) - 3, "one gather fewer per micro-batch (3 micro-batches)"


def test_max_live_parameters_stops_the_prefetch():
    prefetching, capped = _got("gpt-prefetch")["peak_live"], _got("gpt-live-1")["peak_live"]
    assert capped < prefetching
    # What is gathered when needed, with nothing ahead: the largest module (fc: 32 x 128 + 128) and
    # the tied embedding (97 x 32), which stays gathered through backward until its gradient is whole.
    assert capped <= (32 * 128 + 128) + 97 * 32


def test_model_persistence_threshold_caps_what_stays_whole():
    assert _got("gpt-persist-all")["persistent"] > 2
    assert _got("gpt-persist-cap-64")["persistent"] == 2  # two 32-element tensors, then the cap


def test_initialize_leaves_only_the_persistent_parameters_whole():
    """Stage 3 releases the whole model it was handed at set-up, not at each module's first
    forward: before any forward the parameters hold the two persistent tensors and one shared
    one-element placeholder each."""
    got = _got("gpt-persist-cap-64")
    tensors = 2 + 12 * 2 + 2  # wte, wpe, 12 per block, ln_f (lm_head is wte)
    assert got["resident_after_init"] <= 4 * (64 + tensors)


def test_persistence_rule_takes_tensors_in_order_until_the_cap():
    assert persistent_tensors([5, 50, 5, 5, 5], threshold=10, cap=12) == [True, False, True, False, False]
    assert persistent_tensors([5, 50, 5], threshold=10, cap=2**63 - 1) == [True, False, True]
    assert persistent_tensors([10, 9], threshold=10, cap=100) == [False, True], "fewer than the threshold"
