"""The report's statistics: Holm-Bonferroni correction and the verdict's comparison
words (0.00 vs 0.00 is never "more than")."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from kinkgrad.study import analysis as A


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert A.holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert A.holm([0.02], family=8) == [0.16]  # the tests not listed count too
    assert A.holm([0.5, 0.9], family=4) == [1.0, 1.0]
    assert A.holm([]) == []


def _holm_reference(ps: list[float], m: int) -> list[float]:
    """Holm's step-down rule, straight from its definition."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adj = {}
    for k, i in enumerate(order):
        adj[i] = min(1.0, max((m - j) * ps[order[j]] for j in range(k + 1)))
    return [adj[i] for i in range(len(ps))]


@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=12),
    st.integers(0, 20),
)
def test_holm_matches_its_definition_and_bounds(ps, extra):
    m = len(ps) + extra
    adj = A.holm(ps, family=m)
    assert all(
        math.isclose(a, b, rel_tol=1e-12, abs_tol=0) for a, b in zip(adj, _holm_reference(ps, m))
    )
    assert all(p <= a <= 1 for p, a in zip(ps, adj))  # never below the raw p-value
    assert all(a <= min(1.0, m * p) for p, a in zip(ps, adj))  # never above Bonferroni
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    assert all(adj[i] <= adj[j] for i, j in zip(order, order[1:]))  # order kept


def test_zero_vs_zero_is_not_more_than():
    assert A.compare_word(0.0, 0.0) == "as little as"
    assert A.compare_word(0.004, 0.001) == "as little as"  # both print as 0.00
    assert A.compare_word(0.3, 0.0) == "more than"
    assert A.compare_word(0.0, 0.3) == "less than"
    assert A.compare_word(0.3, 0.2) == "about as much as"
    assert "not measured" in A.compare_word(math.nan, 0.0)
