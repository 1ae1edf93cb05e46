"""Pair accuracy and RewardBench section scores against hand-computed values."""

import math

import pytest

from nemokern.train.rewardbench import accuracy_report


def test_ties_are_wrong_and_subsets_count_separately():
    r = accuracy_report([2.0, 1.0, 0.5, 3.0], [1.0, 1.0, 0.7, -1.0], ["a", "a", "b", "b"])
    assert r["n"] == 4 and r["accuracy"] == 0.5
    assert r["subsets"] == {"a": {"accuracy": 0.5, "n": 2}, "b": {"accuracy": 0.5, "n": 2}}
    assert "sections" not in r and "overall" not in r


def test_sections_weighting_and_math_upweighted_to_equal_code():
    rows = []  # (subset, n, n_right)
    rows += [("alpacaeval-easy", 4, 4), ("mt-bench-easy", 1, 0)]  # Chat: 4/5
    rows += [("llmbar-natural", 3, 1)]  # Chat Hard: 1/3
    rows += [("math-prm", 2, 2), ("hep-go", 3, 0), ("hep-rust", 1, 1)]  # Reasoning
    chosen, rejected, subsets = [], [], []
    for name, n, k in rows:
        for i in range(n):
            chosen.append(1.0 if i < k else 0.0)
            rejected.append(0.5)
            subsets.append(name)
    r = accuracy_report(chosen, rejected, subsets)
    assert r["sections"]["Chat"] == pytest.approx(4 / 5)
    assert r["sections"]["Chat Hard"] == pytest.approx(1 / 3)
    # math (acc 1.0) weighs as much as the 4 code pairs together (acc 1/4): (1 * 4 + 1) / 8
    assert r["sections"]["Reasoning"] == pytest.approx((1.0 * 4 + 0.0 * 3 + 1.0 * 1) / 8)
    assert "Safety" not in r["sections"]
    assert r["overall"] == pytest.approx((4 / 5 + 1 / 3 + 5 / 8) / 3)


def test_preference_ties_are_left_out_and_counted():
    r = accuracy_report(
        [2.0, 1.0, 0.5, 3.0], [1.0, 3.0, 0.7, -1.0], ["a", "a", "b", "b"], strengths=[1, 0, 0, 3]
    )
    assert r["n"] == 2 and r["ties"] == 2 and r["accuracy"] == 1.0
    assert r["mean_margin"] == pytest.approx((1.0 + 4.0) / 2)
    assert r["subsets"] == {"a": {"accuracy": 1.0, "n": 1}, "b": {"accuracy": 1.0, "n": 1}}
    with pytest.raises(ValueError, match="1 strengths for 2 pairs"):
        accuracy_report([1.0, 2.0], [0.0, 0.0], strengths=[1])


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 chosen scores but 1 rejected"):
        accuracy_report([1.0, 2.0], [0.0])
    assert math.isnan(accuracy_report([], [])["accuracy"])
