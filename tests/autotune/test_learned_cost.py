"""The learned cost model: the fit itself, its prior, and the tuner re-ranking with it."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest

from zeroplan.autotune.learned_cost import LearnedCost, Observation, Ranked, fit, overhead_prior
from zeroplan.autotune.tune import Tuner, TuneSettings, plan_key, tune
from zeroplan.schemas import CLUSTER_PRESETS, MODEL_PRESETS

from .conftest import tiny_config

TINY = MODEL_PRESETS["tiny"]
CPU = CLUSTER_PRESETS["cpu"]
SPACE = {"zero_optimization.stage": {"choices": [0, 1, 2, 3]}, "train_micro_batch_size_per_gpu": {"choices": [1, 2, 4]}}


def test_the_fit_recovers_known_scales_from_synthetic_measurements():
    truth = {"compute": 3.0, "dp_comm": 0.5, "micro_step_overhead": 6.0}
    observations = []
    for i in range(24):
        terms = {"compute": 0.1 + 0.05 * (i % 5), "dp_comm": 0.02 + 0.07 * (i % 3),
                 "micro_step_overhead": 0.03 * (i % 4)}
        observations.append(Observation(terms, sum(truth[k] * v for k, v in terms.items())))
    learned = fit(observations)  # the prior pulls each scale toward 1.0 a little
    for name, scale in truth.items():
        assert learned.scales[name] == pytest.approx(scale, rel=0.1)
    assert learned.per_step_s == pytest.approx(0.0, abs=0.01) and learned.trials == 24
    exact = fit(observations, prior=1e-9)  # without it, exactly
    for name, scale in truth.items():
        assert exact.scales[name] == pytest.approx(scale, rel=1e-3)


def test_with_no_trial_it_is_the_cost_model():
    tuner = Tuner(data=tiny_config(autotuning={"space": SPACE}), model=TINY, cluster=CPU,
                  settings=TuneSettings(model_name="tiny", nproc_per_node=2))
    learned = fit([])
    assert learned == LearnedCost()
    for ranked in tuner.ranked():
        plan = tuner.candidate(ranked.params).plan
        assert learned.predict(ranked.terms) == pytest.approx(plan.estimates.predicted_step_time_s)


def test_a_term_no_trial_exercised_keeps_its_prior():
    learned = fit([Observation({"compute": 1.0}, 2.0)])
    unexercised = learned.predict({"compute": 1.0, "offload_transfer": 0.5}) - learned.predict({"compute": 1.0})
    assert unexercised == pytest.approx(0.5)
    assert 1.0 < learned.scales["compute"] <= 2.0


def _complete(study: optuna.Study, tuner: Tuner, params: dict, *, measured_s: float) -> None:
    """A trial of `params` that measured `measured_s` per step, recorded as the tuner records one."""
    trial = study.ask(fixed_distributions={})
    plan = tuner.candidate(params).plan
    trial.set_user_attr("plan_key", plan_key(plan))
    trial.set_user_attr("predicted_terms", dict(plan.estimates.step_time_breakdown_s))
    trial.set_user_attr("measured_step_time_s", measured_s)
    trial.set_user_attr("global_batch", plan.batch.global_batch_size)
    study.tell(trial, plan.batch.global_batch_size / measured_s)
    tuner.after_trial(study, study.trials[trial.number])


def _queued(study: optuna.Study) -> list[dict]:
    return [t.system_attrs["fixed_params"] for t in study.trials if t.state == optuna.trial.TrialState.WAITING]


def test_the_ranking_changes_after_a_trial_that_contradicts_the_prior():
    """The prior ranks A (little tensor-parallel traffic) before B (much). A trial of a plan
    whose step is nearly all tensor-parallel traffic measures a tenth of its prediction: that
    term was overestimated, and B now ranks first."""
    a = Ranked("a", {"x": 1}, {"compute": 1.0, "tp_comm": 0.1}, global_batch=8)
    b = Ranked("b", {"x": 2}, {"compute": 0.5, "tp_comm": 0.8}, global_batch=8)
    prior = LearnedCost()
    assert min((a, b), key=lambda r: r.seconds_per_sample(prior)) is a
    learned = fit([Observation({"compute": 0.05, "tp_comm": 1.0}, 0.15)])
    assert learned.scales["tp_comm"] < 0.2 and learned.scales["compute"] == pytest.approx(1.0, abs=0.05)
    assert min((a, b), key=lambda r: r.seconds_per_sample(learned)) is b


def test_the_tuner_enqueues_the_refitted_models_best_untried_plan():
    tuner = Tuner(data=tiny_config(autotuning={"space": SPACE}), model=TINY, cluster=CPU,
                  settings=TuneSettings(model_name="tiny", nproc_per_node=2, warm_start=2, max_trials=10))
    first = tuner.ranked()[0]
    study = optuna.create_study(direction="maximize")
    _complete(study, tuner, first.params, measured_s=5 * LearnedCost().predict(first.terms))
    learned = tuner.learned(study)
    assert learned.trials == 1 and learned.predict(first.terms) > 2 * LearnedCost().predict(first.terms)
    expected = min(tuner.ranked()[1:], key=lambda r: r.seconds_per_sample(learned))
    assert _queued(study) == [expected.params]  # still in the warm start: enqueued unconditionally
    _complete(study, tuner, expected.params, measured_s=5 * LearnedCost().predict(expected.terms))
    assert len(_queued(study)) == 0  # warm start over, and nothing is predicted to beat the best measured


def test_after_the_warm_start_it_enqueues_only_a_predicted_improvement():
    tuner = Tuner(data=tiny_config(autotuning={"space": SPACE}), model=TINY, cluster=CPU,
                  settings=TuneSettings(model_name="tiny", nproc_per_node=2, warm_start=1, max_trials=10))
    best = tuner.ranked()[0]
    study = optuna.create_study(direction="maximize")
    # measured exactly as predicted: the model's other candidates are all predicted slower
    _complete(study, tuner, best.params, measured_s=LearnedCost().predict(best.terms))
    assert _queued(study) == []


def test_overhead_prior_matches_the_model_info_timing():
    cluster = CPU.model_copy(update={"rates": CPU.rates.model_copy(update={"micro_step_overhead": 0.002,
                                                                           "layer_overhead": 0.001})})
    r = overhead_prior(cluster, TINY, micro_step_s=1.0).rates
    assert r.micro_step_overhead / r.layer_overhead == pytest.approx(2.0)  # the probe's split is kept
    overhead = r.micro_step_overhead + TINY.layers * r.layer_overhead
    assert 0.5 < overhead < 1.0  # the timing less tiny's matmul time at micro-batch 1
    assert overhead_prior(cluster, TINY, micro_step_s=1e-6) == cluster  # matmul alone takes longer
    assert overhead_prior(CLUSTER_PRESETS["h100-80"], TINY, micro_step_s=1.0) == CLUSTER_PRESETS["h100-80"]


def test_trials_csv_and_the_report_carry_the_prediction_error(tmp_path, fake_launcher):
    settings = TuneSettings(model_name="tiny", nproc_per_node=2, out_dir=tmp_path, max_trials=3, sampler="tpe",
                            pruner="none", warmup_steps=1, measured_steps=2, trial_timeout_s=60, seed=0,
                            warm_start=2)
    tune(data=tiny_config(autotuning={"space": SPACE}), model=TINY, cluster=CPU, settings=settings,
         launcher=fake_launcher())
    frame = pd.read_csv(tmp_path / "trials.csv")
    ran = frame[frame["duplicate_of"].isna() & (frame["state"] == "complete")]
    assert len(ran) >= 2
    expected = (ran["learned_step_time_s"] - ran["measured_step_time_s"]) / ran["measured_step_time_s"]
    assert ran["prediction_error"].tolist() == pytest.approx(expected.tolist())
    assert ran["learned_from_trials"].tolist()[:2] == [0, 1]  # each fitted to the trials before it
    assert "prediction error" in (tmp_path / "report.md").read_text()
    assert "Step-time prediction error, per trial" in (tmp_path / "report.html").read_text()
