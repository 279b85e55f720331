"""Intervals and paired tests: hand-worked cases, and scipy's as the oracle."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binomtest

from llama2.eval.stats import mcnemar, sign_test, spread, wilson


def test_wilson_hand_worked():
    # 8 of 10: p = 0.8, z^2 = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71674,
    # half-width 1.95996 / 1.38415 * sqrt(0.016 + 0.0096037) = 0.22658
    r = wilson(8, 10)
    assert r.value == 0.8
    assert r.low == pytest.approx(0.49016, abs=1e-4)
    assert r.high == pytest.approx(0.94332, abs=1e-4)
    # none of 100: the interval still reaches 3.7% (the normal approximation gives [0, 0])
    r = wilson(0, 100)
    assert r.low == 0.0 and r.high == pytest.approx(0.03699, abs=1e-4)
    assert str(wilson(1, 2)) == "50.0% [9.5, 90.5]"


@given(st.integers(0, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_matches_scipy(kn):
    k, n = kn
    if n == 0:
        assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)
        return
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    r = wilson(k, n)
    assert r.low == pytest.approx(ci.low, abs=1e-9)
    assert r.high == pytest.approx(ci.high, abs=1e-9)
    assert r.low <= k / n <= r.high


def test_sign_test_hand_worked():
    # 9 wins, 1 loss: P(X <= 1) for X ~ Bin(10, 1/2) is 11/1024, doubled
    assert sign_test(9, 1) == pytest.approx(22 / 1024)
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        sign_test(-1, 3)


@given(st.integers(0, 200), st.integers(0, 200))
def test_sign_test_matches_scipy(wins, losses):
    if wins + losses == 0:
        return
    expected = binomtest(wins, wins + losses, 0.5).pvalue
    assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mcnemar_counts_discordant_pairs():
    a = [True, True, True, False, False, True, True]
    b = [True, False, False, False, True, False, False]
    r = mcnemar(a, b)
    assert (r.first, r.second, r.both, r.neither) == (4, 1, 1, 1)
    assert r.p_value == pytest.approx(sign_test(4, 1)) and not r.significant
    r = mcnemar([True] * 30, [False] * 30)
    assert r.significant and r.p_value == pytest.approx(2 / 2**30)
    with pytest.raises(ValueError, match="same items"):
        mcnemar([True], [True, False])


def test_spread():
    s = spread([0.5, 0.7, 0.6])
    assert (s.mean, s.low, s.high, s.n) == (pytest.approx(0.6), 0.5, 0.7, 3)
    with pytest.raises(ValueError):
        spread([])
