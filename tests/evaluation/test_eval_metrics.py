"""Metrics: pass@k against the closed form, avg@k, maj@k, standard errors, breakdowns and length statistics."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.metrics import (
    breakdown,
    length_stats,
    majority_vote,
    mean_se,
    pass_at_k,
    pass_ks,
    score_metrics,
)


def closed_form(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k), exactly (math.comb is 0 when k > n - c)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# hand-checked: (n, c, k, value)
HAND = [
    (5, 2, 1, Fraction(2, 5)),  # pass@1 is c/n
    (5, 2, 2, Fraction(7, 10)),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 2, Fraction(1, 2)),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 3, 5, Fraction(11, 12)),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
    (16, 0, 8, Fraction(0)),  # nothing correct
    (16, 16, 1, Fraction(1)),  # everything correct
    (8, 5, 4, Fraction(1)),  # n - c = 3 < k: every 4-subset holds a correct one
    (3, 1, 3, Fraction(1)),
]


@pytest.mark.parametrize("n,c,k,value", HAND)
def test_pass_at_k_hand_checked(n: int, c: int, k: int, value: Fraction) -> None:
    assert closed_form(n, c, k) == value
    got = pass_at_k(torch.tensor([n]), torch.tensor([c]), k)
    assert got.dtype == torch.float64
    assert float(got[0]) == pytest.approx(float(value), abs=1e-12)


def test_pass_at_k_is_vectorised_over_problems() -> None:
    n = torch.tensor([h[0] for h in HAND if h[0] >= 3])
    c = torch.tensor([h[1] for h in HAND if h[0] >= 3])
    got = pass_at_k(n, c, 3)
    want = [float(closed_form(int(a), int(b), 3)) for a, b in zip(n, c)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_exact_closed_form(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    got = float(pass_at_k(torch.tensor([n]), torch.tensor([c]), k)[0])
    assert got == pytest.approx(float(closed_form(n, c, k)), rel=1e-9, abs=1e-12)


def test_pass_at_k_stable_for_large_n() -> None:
    # C(10000, 5000) overflows float64 by hundreds of orders of magnitude; the log-space form does not care
    got = pass_at_k(torch.tensor([10000, 10000, 6000]), torch.tensor([1, 0, 5999]), 5000)
    assert got.tolist() == pytest.approx([0.5, 0.0, 1.0], abs=1e-9)
    assert float(pass_at_k(torch.tensor([1000]), torch.tensor([1]), 1)[0]) == pytest.approx(1e-3, rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_properties(nc: tuple[int, int]) -> None:
    n, c = nc
    vals = pass_at_k(torch.full((n,), n), torch.full((n,), c), 1)
    assert float(vals[0]) == pytest.approx(c / n)  # pass@1 == mean accuracy
    curve = [float(pass_at_k(torch.tensor([n]), torch.tensor([c]), k)[0]) for k in range(1, n + 1)]
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))  # never decreases in k
    assert curve[-1] == (1.0 if c > 0 else 0.0)  # pass@n: any correct at all


def test_pass_at_k_refuses_k_above_n() -> None:
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(torch.tensor([4, 2]), torch.tensor([1, 1]), 3)


def test_pass_ks() -> None:
    assert pass_ks(1) == [1]
    assert pass_ks(16) == [1, 2, 4, 8, 16]
    assert pass_ks(6) == [1, 2, 4, 6]


def test_score_metrics_on_a_small_table() -> None:
    correct = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # (P=3, k=4)
    maj = torch.tensor([False, False, True])
    m = score_metrics(correct, maj)
    assert m["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@2"] == pytest.approx((float(closed_form(4, 2, 2)) + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)
    per = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    assert m["avg@4_se"] == pytest.approx(float(per.std() / math.sqrt(3)))
    assert set(m) == {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4"} | {
        k + "_se" for k in ("avg@4", "pass@1", "pass@2", "pass@4", "maj@4")}


def test_mean_se() -> None:
    assert mean_se(torch.tensor([1.0])) == (1.0, 0.0)
    mean, se = mean_se(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2)


def numeric_same(a: str, b: str) -> bool:
    try:
        return abs(float(Fraction(a)) - float(Fraction(b))) < 1e-12
    except ValueError:
        return a == b


def test_majority_vote_groups_by_equivalence() -> None:
    # "1/2" and "0.5" are one answer; it has 3 votes against "2"'s 2
    answers = ["2", "1/2", None, "0.5", "2", "0.50"]
    assert majority_vote(answers, numeric_same) == 1
    assert majority_vote(answers, lambda a, b: a == b) == 0  # by string, "2" wins (2 votes, first seen)


def test_majority_vote_ties_go_to_the_first_group_and_none_do_not_vote() -> None:
    assert majority_vote(["b", "a", "a", "b"], str.__eq__) == 0
    assert majority_vote([None, None, "x"], str.__eq__) == 2
    assert majority_vote([None, None], str.__eq__) is None
    assert majority_vote([], str.__eq__) is None


def test_majority_vote_is_invariant_to_order_when_the_winner_is_strict() -> None:
    answers = ["3", "4", "3", "5", "3", "4"]
    import itertools

    for perm in itertools.islice(itertools.permutations(answers), 0, 200, 7):
        assert perm[majority_vote(list(perm), str.__eq__)] == "3"


def test_breakdown() -> None:
    correct = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 1]], dtype=torch.bool)
    out = breakdown(correct, ["Algebra", 2, "Algebra", 2])
    assert out["Algebra"]["n"] == 2 and out["Algebra"]["accuracy"] == pytest.approx(0.25)
    assert out["2"]["n"] == 2 and out["2"]["accuracy"] == pytest.approx(1.0)
    assert sum(v["n"] for v in out.values()) == 4


def test_length_stats() -> None:
    lengths = torch.tensor([[10, 20], [30, 40], [50, 1000]])
    finished = torch.tensor([[True, True], [True, True], [True, False]])
    correct = torch.tensor([[True, False], [True, False], [False, False]])
    s = length_stats(lengths, finished, correct)
    assert s["mean"] == pytest.approx(1150 / 6)
    assert s["max"] == 1000 and s["truncated"] == pytest.approx(1 / 6)
    assert s["mean_correct"] == pytest.approx(20) and s["mean_incorrect"] == pytest.approx(1110 / 4)
    assert length_stats(lengths, finished, torch.zeros_like(correct))["mean_correct"] is None


CANON = {"1/2": "h", "0.5": "h", "2": "2", "2.0": "2", "3": "3"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([None, "1/2", "0.5", "2", "2.0", "3"]), min_size=1, max_size=10))
def test_majority_correct_matches_a_brute_force_vote(answers: list[str | None]) -> None:
    """Gold is 1/2; brute force: count votes per canonical value, largest wins, a tie goes to the value seen first."""
    correct = [a is not None and CANON[a] == "h" for a in answers]
    calls = []

    def same(a: str, b: str) -> bool:
        calls.append((a, b))
        return CANON[a] == CANON[b]

    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[CANON[a]] = counts.get(CANON[a], 0) + 1
    want = bool(counts) and max(counts, key=lambda v: counts[v]) == "h"  # dicts keep first-seen order
    from evaluation.metrics import majority_correct

    assert majority_correct(answers, correct, same) == want
    c, n_wrong = sum(correct), sum(a is not None and not ok for a, ok in zip(answers, correct))
    if c == 0 or n_wrong < c:
        assert calls == []  # decided without comparing answers
    assert all("\x00gold" not in pair for pair in calls)
