"""The benchmarks' statistics (bench/common.py) against values computed by hand."""

from __future__ import annotations

import pytest

from bench.common import (
    interleave,
    judge,
    median_interval,
    paired_ratios,
    quantile,
    ratio_rows,
    ratio_summary,
    round_orders,
    spread,
    verdict,
    with_spread,
)


def test_quantile_interpolates_between_order_statistics():
    xs = [3.0, 1.0, 4.0, 2.0]  # sorted 1, 2, 3, 4
    assert quantile(xs, 0.5) == 2.5  # position 1.5
    assert quantile(xs, 0.25) == 1.75  # position 0.75: 1 + 0.75 × (2 − 1)
    assert quantile(xs, 0.75) == 3.25  # position 2.25: 3 + 0.25 × (4 − 3)
    assert quantile(xs, 0.0) == 1.0 and quantile(xs, 1.0) == 4.0
    assert quantile([7.0], 0.5) == 7.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_spread_of_five_rounds():
    assert spread([5.0, 1.0, 4.0, 2.0, 3.0]) == {"median": 3.0, "min": 1.0, "max": 5.0, "iqr": [2.0, 4.0],
                                                 "rounds": 5}


def test_paired_ratios_are_taken_within_each_round():
    # the machine gets twice as fast, then 4× slower: both sides drift together, the ratio does not
    assert paired_ratios([2.0, 4.0, 1.0], [4.0, 8.0, 2.0]) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="2 and 3"):
        paired_ratios([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("xs, expected", [
    # 5 rounds: min–max, coverage 1 − 2·(1/2)^5 = 30/32
    ([0.9, 1.1, 1.0, 0.95, 1.05], (0.9, 1.1, 0.9375)),
    # 6 rounds: min–max, 1 − 2/64
    ([6.0, 1.0, 5.0, 2.0, 4.0, 3.0], (1.0, 6.0, 0.96875)),
    # 8 rounds: 2nd and 7th values, 1 − 2·(1 + 8)/256; the 3rd and 6th would give 1 − 2·37/256 = 0.71
    ([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0], (2.0, 7.0, 0.9296875)),
    # 10 rounds: 2nd and 9th, 1 − 2·11/1024; the 3rd and 8th give 1 − 2·56/1024 = 0.89 < 0.90
    ([float(i) for i in range(10, 0, -1)], (2.0, 9.0, 0.978515625)),
    # too few rounds for 0.90: min–max with what it covers
    ([1.0, 2.0, 3.0, 4.0], (1.0, 4.0, 0.875)),
    ([2.0], (2.0, 2.0, 0.0)),
])
def test_median_interval_is_the_order_statistic_interval(xs, expected):
    low, high, coverage = median_interval(xs)
    assert (low, high) == expected[:2]
    assert coverage == pytest.approx(expected[2])


def test_median_interval_at_another_confidence():
    # 8 rounds at 0.70: the 3rd and 6th values cover 1 − 2·37/256 = 0.7109
    low, high, coverage = median_interval([float(i) for i in range(1, 9)], confidence=0.70)
    assert (low, high) == (3.0, 6.0)
    assert coverage == pytest.approx(0.7109375)


def test_ratio_summary_over_paired_rounds():
    s = ratio_summary([2.0, 1.9, 2.1, 2.0, 1.8], [2.0, 2.0, 2.0, 2.5, 1.5])
    # per round 1.0, 0.95, 1.05, 0.8, 1.2
    assert s["per_round"] == pytest.approx([1.0, 0.95, 1.05, 0.8, 1.2])
    assert s["median"] == pytest.approx(1.0)
    assert s["interval"] == pytest.approx([0.8, 1.2])
    assert s["rounds"] == 5 and s["coverage"] == pytest.approx(0.9375)


@pytest.mark.parametrize("interval, expected", [
    ([0.96, 1.02], "met"),
    ([0.95, 1.00], "met"),  # at the target counts as reaching it
    ([0.80, 0.94], "not met"),
    ([0.90, 1.00], "undecided"),  # straddles 0.95
    ([0.90, 0.95], "undecided"),  # touches it from below
])
def test_verdict_against_a_goal_of_at_least_095(interval, expected):
    assert verdict(interval, 0.95) == expected


def test_verdict_is_undecided_with_too_few_rounds():
    assert verdict([0.96, 1.02], 0.95, coverage=0.875) == "undecided"  # 4 rounds
    assert verdict([0.80, 0.94], 0.95, coverage=0.9375) == "not met"  # 5 rounds


def test_round_orders_shuffle_each_round_reproducibly():
    names = ["a", "b", "c", "d", "e"]
    orders = round_orders(names, 6, seed=3)
    assert len(orders) == 6 and all(sorted(o) == names for o in orders)
    assert orders == round_orders(names, 6, seed=3)
    assert len({tuple(o) for o in orders}) > 1


def test_tables_show_median_and_spread():
    assert with_spread(3.64, 3.5, 3.7) == "3.64 (3.5–3.7)"
    spreads = {"speed": {"interval": [0.9, 1.1], "rounds": 5}}
    verdicts = [{"ratio": "speed", "target": 0.95, "verdict": "undecided"}]
    assert ratio_rows({"speed": 1.0, "memory": 0.99}, spreads, verdicts) == [
        {"ratio": "speed", "median": 1.0, "interval": "0.9–1.1", "rounds": 5, "goal": "≥ 0.95",
         "verdict": "undecided"},
        {"ratio": "memory", "median": 0.99, "interval": "one value", "rounds": None, "goal": None, "verdict": None},
    ]


def test_judge_reports_the_goal_and_its_verdict():
    s = ratio_summary([1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.1, 1.0, 0.9, 1.25])  # 1, 0.909, 1, 1.111, 0.8
    j = judge("speed", s, 0.95, "speed ≥ 0.95")
    assert j["interval"] == pytest.approx([0.8, 1 / 0.9]) and j["median"] == 1.0
    assert j["verdict"] == "undecided" and j["rounds"] == 5 and j["target"] == 0.95


def test_interleave_takes_turns_in_slices_reversing_every_other_turn():
    assert interleave(["a", "b", "c"], 12, 5) == [("a", 5), ("b", 5), ("c", 5), ("c", 5), ("b", 5), ("a", 5),
                                                  ("a", 2), ("b", 2), ("c", 2)]
    assert interleave(["a", "b"], 6, 6) == [("a", 6), ("b", 6)]  # one slice: each runs its steps at once
    assert interleave(["a", "b"], 4, 10) == [("a", 4), ("b", 4)]
