"""Evaluation metrics over ``P`` problems with ``k`` graded samples each: avg@k, unbiased pass@k, maj@k, standard
errors, breakdowns and response-length statistics.

All estimators are vectorised over problems; inputs are ``correct (P, k)`` bool tensors and friends. Standard errors
are over problems (the sample standard deviation of the per-problem score divided by sqrt(P)); they describe the
spread due to which problems were asked, plus, for avg@k, the sampling noise within each problem.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def pass_at_k(n: Tensor, c: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per problem (Chen et al., 2021): ``1 - C(n-c, k) / C(n, k)``.

    ``n`` (P,) samples drawn and ``c`` (P,) of them correct; returns (P,) float64. Computed in log space with
    ``lgamma`` so that large ``n`` neither overflows (no huge binomials) nor underflows (no long product); the
    absolute error is about ``1e-16 * n log n``;
    where ``n - c < k`` every size-k subset holds a correct sample and the estimate is exactly 1.
    """
    n = n.to(torch.float64)
    c = c.to(torch.float64)
    if k < 1 or bool((n < k).any()):
        raise ValueError(f"pass@{k} needs 1 <= k <= n for every problem; smallest n is {int(n.min())}")
    fail = n - c  # (P,)
    always = fail < k
    f = torch.where(always, torch.full_like(fail, float(k)), fail)  # keep lgamma's argument valid where unused
    log_ratio = (torch.lgamma(f + 1) - torch.lgamma(f - k + 1)) - (torch.lgamma(n + 1) - torch.lgamma(n - k + 1))
    return torch.where(always, torch.ones_like(n), 1.0 - torch.exp(log_ratio))


def mean_se(x: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of per-problem scores ``x`` (P,); the SE is 0 for a single problem."""
    x = x.to(torch.float64)
    mean = float(x.mean())
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else 0.0
    return mean, se


def pass_ks(n: int) -> list[int]:
    """The k reported for pass@k with n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Answers are grouped greedily: each joins the first earlier group whose first answer it is ``same`` as (so grouping
    is by equivalence, e.g. ``0.5`` and ``\\frac12`` vote together). The largest group wins; a tie goes to the group
    seen first. The winner is that group's first member. Samples with no answer do not vote.
    """
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if same(answers[g[0]], a):  # type: ignore[arg-type]
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first of equal-sized groups


_GOLD = "\x00gold"  # stands for "the gold answer" in majority_correct's votes


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool], same: Callable[[str, str], bool]) -> bool:
    """Whether the majority vote of one problem's samples (see :func:`majority_vote`) picks a correct answer.

    The samples graded correct are all the gold answer, so they form one group without comparing them; a wrong
    answer never joins it. That gives two shortcuts that skip the (possibly slow) ``same`` calls entirely: no correct
    sample means the vote is wrong, and fewer wrong answers than correct samples means it is right. Only contested
    problems group the wrong answers with ``same``. Equal to ``majority_vote`` with every correct sample's answer
    replaced by the gold answer.
    """
    c = sum(bool(x) for x in correct)
    n_wrong = sum(1 for a, ok in zip(answers, correct) if a is not None and not ok)
    if c == 0:
        return False
    if n_wrong < c:
        return True
    votes = [_GOLD if ok else a for a, ok in zip(answers, correct)]
    winner = majority_vote(votes, lambda x, y: x == y if _GOLD in (x, y) else same(x, y))
    return winner is not None and bool(correct[winner])


def score_metrics(correct: Tensor, maj_correct: Tensor) -> dict[str, float]:
    """avg@k, pass@j for j in :func:`pass_ks`, maj@k and their standard errors.

    ``correct`` (P, k) bool; ``maj_correct`` (P,) bool (the majority answer's grade). Keys: ``avg@k``, ``pass@j``,
    ``maj@k``, each with a ``_se`` twin.
    """
    P, k = correct.shape
    n = torch.full((P,), k, dtype=torch.long)
    c = correct.sum(1)  # (P,)
    out: dict[str, float] = {}
    out[f"avg@{k}"], out[f"avg@{k}_se"] = mean_se(correct.to(torch.float64).mean(1))
    for j in pass_ks(k):
        out[f"pass@{j}"], out[f"pass@{j}_se"] = mean_se(pass_at_k(n, c, j))
    out[f"maj@{k}"], out[f"maj@{k}_se"] = mean_se(maj_correct.to(torch.float64))
    return out


def breakdown(correct: Tensor, keys: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Mean accuracy (avg@k) per group: ``keys[p]`` is problem p's group (e.g. its subject). ``correct`` (P, k)."""
    per_problem = correct.to(torch.float64).mean(1)  # (P,)
    out: dict[str, dict[str, float]] = {}
    for key in sorted({str(k) for k in keys}):
        idx = torch.tensor([str(k) == key for k in keys])
        mean, se = mean_se(per_problem[idx])
        out[key] = {"n": int(idx.sum()), "accuracy": mean, "accuracy_se": se}
    return out


def length_stats(lengths: Tensor, finished: Tensor, correct: Tensor) -> dict[str, float | None]:
    """Response length in tokens: ``lengths`` (P, k) long, ``finished`` (P, k) bool (ended with EOS), ``correct``.

    Returns mean, median, p90, max, the share cut at max_new_tokens (``truncated``), and the mean length of correct
    and of incorrect responses (None when there are none).
    """
    L = lengths.to(torch.float64).flatten()
    ok = correct.flatten()

    def mean_of(mask: Tensor) -> float | None:
        return float(L[mask].mean()) if bool(mask.any()) else None

    return {
        "mean": float(L.mean()),
        "median": float(L.median()),
        "p90": float(torch.quantile(L, 0.9)),
        "max": float(L.max()),
        "truncated": float((~finished).to(torch.float64).mean()),
        "mean_correct": mean_of(ok),
        "mean_incorrect": mean_of(~ok),
    }
