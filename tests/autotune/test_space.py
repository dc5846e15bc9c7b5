"""Search-space construction from configs."""

from __future__ import annotations

import optuna

from zeroplan.autotune.space import DEGREES, Dimension, apply, degree_choices, search_space, suggest
from zeroplan.schemas import MODEL_PRESETS, load_config, validate_config

TINY = MODEL_PRESETS["tiny"]  # 4 heads, hidden 128, 6 layers


def _names(dims: list[Dimension]) -> list[str]:
    return [d.name for d in dims]


def test_fixed_config_has_no_dimensions():
    cfg = load_config({"train_batch_size": 16, "zero_optimization": {"stage": 2}})
    assert search_space(cfg, world_size=2, model=TINY) == []


def test_auto_fields_become_dimensions_with_default_ranges():
    cfg = load_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto",
                       "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "auto"},
                                             "offload_param": {"device": "auto"}, "overlap_comm": "auto"}})
    dims = {d.name: d for d in search_space(cfg, world_size=4, model=TINY)}
    assert dims["zero_optimization.stage"].choices == (0, 1, 2, 3)
    assert dims["train_micro_batch_size_per_gpu"].choices == (1, 2, 4, 8, 16)  # 64 / 4 ranks
    assert dims["zero_optimization.offload_optimizer.device"].choices == ("none", "cpu")
    assert dims["zero_optimization.offload_param.device"].only_if == ("zero_optimization.stage", 3)
    assert dims["zero_optimization.overlap_comm"].choices == (False, True)


def test_nvme_is_a_choice_only_when_a_path_is_configured():
    cfg = load_config({"train_batch_size": 8, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "auto", "nvme_path": "/nvme"}}})
    (dim,) = search_space(cfg, world_size=2, model=TINY)
    assert dim.choices == ("none", "cpu", "nvme")


def test_explicit_ranges_win_over_defaults():
    cfg = load_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "autotuning": {"space": {
        "train_micro_batch_size_per_gpu": {"low": 1, "high": 16, "log": True},
        "zero_optimization.stage": {"choices": [1, 2]}}}})
    dims = {d.name: d for d in search_space(cfg, world_size=2, model=TINY)}
    assert dims["train_micro_batch_size_per_gpu"] == Dimension("train_micro_batch_size_per_gpu", low=1, high=16, log=True)
    assert dims["zero_optimization.stage"].choices == (1, 2)


def test_degree_factorisations_respect_the_model():
    assert degree_choices(world_size=8, model=TINY) == [
        (8, 1, 1), (4, 1, 2), (2, 1, 4), (4, 2, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1), (1, 4, 2)]
    # tp must divide the 4 heads, pp at most the 6 layers
    assert all(4 % tp == 0 and pp <= 6 for _, tp, pp in degree_choices(world_size=16, model=TINY))


def test_degrees_dimension_keeps_fixed_degrees_fixed():
    cfg = load_config({"train_batch_size": 64, "parallel": {"dp": "auto", "tp": 2}})
    (dim,) = search_space(cfg, world_size=8, model=TINY)
    assert dim.name == DEGREES and dim.choices == ("4.2.1",)
    cfg = load_config({"train_batch_size": 64, "parallel": {"tp": "auto", "pp": "auto"}})
    (dim,) = search_space(cfg, world_size=4, model=TINY)
    assert set(dim.choices) == {"4.1.1", "2.1.2", "1.1.4", "2.2.1", "1.2.2", "1.4.1"}


def test_conditional_offload_param_and_apply_round_trip():
    data = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto",
            "zero_optimization": {"stage": "auto", "offload_param": {"device": "auto"}},
            "parallel": {"dp": "auto", "tp": "auto"}}
    cfg = validate_config(dict(data))
    dims = search_space(cfg, world_size=2, model=TINY)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_stages = set()
    for _ in range(20):
        trial = study.ask()
        params = suggest(trial, dims, config=cfg)
        seen_stages.add(params["zero_optimization.stage"])
        assert ("zero_optimization.offload_param.device" in params) == (params["zero_optimization.stage"] == 3)
        concrete = validate_config(apply(data, params), world_size=2)
        assert concrete.zero_optimization.stage == params["zero_optimization.stage"]
        assert concrete.parallel.dp * concrete.parallel.tp * concrete.parallel.pp == 2
        study.tell(trial, 1.0)
    assert len(seen_stages) > 1

