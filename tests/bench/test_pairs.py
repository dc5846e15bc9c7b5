"""bench/pairs.py: interleaved pairs and the bootstrap interval of their median ratio."""

from __future__ import annotations

from bench.pairs import interleave, median_interval


def test_interval_holds_the_median_and_separates_only_a_consistent_difference():
    faster = median_interval([1.12, 1.08, 1.15, 1.10, 1.09, 1.13, 1.11])
    assert faster.low <= faster.median <= faster.high and faster.low > 1.0
    assert faster.verdict(above="faster", below="slower") == "faster"
    mixed = median_interval([0.8, 1.2, 0.95, 1.1, 1.05, 0.9, 1.0])
    assert not mixed.separated and mixed.verdict(above="faster", below="slower") == "not separated"
    slower = median_interval([0.7, 0.72, 0.69, 0.75, 0.71])
    assert slower.high < 1.0 and slower.verdict(above="faster", below="slower") == "slower"


def test_one_pair_is_never_separated():
    one = median_interval([0.9996])
    assert not one.separated and one.verdict(above="faster", below="slower") == "not separated"
    assert one.text() == "1.00x (one pair: no interval)"


def test_interval_is_reproducible_from_the_ratios():
    ratios = [0.93, 1.04, 0.99, 1.21, 0.88, 1.02]
    assert median_interval(ratios) == median_interval(list(ratios))
    assert median_interval(ratios, level=0.5).high - median_interval(ratios, level=0.5).low \
        <= median_interval(ratios, level=0.9).high - median_interval(ratios, level=0.9).low


def test_pairs_alternate_which_system_runs_first():
    order = []
    runs = interleave(lambda: order.append("a") or len(order), lambda: order.append("b") or len(order), pairs=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert runs.a == [1, 4, 5, 8] and runs.b == [2, 3, 6, 7] and len(runs.load) == 4
    assert runs.ratios(float) == [1 / 2, 4 / 3, 5 / 6, 8 / 7]
