"""The benchmark path against the real data: load -> gold answer written as a model would -> grade.

For each benchmark, every gold answer is wrapped as a model writes it ("... so the answer is \\boxed{<answer>}") and
must be accepted, and another row's (different) answer must be rejected, for at least 99% of the rows. The exact
figures and every failure are printed (run with ``-s`` to see them; they are also in the assertion message).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.benchmarks import load_benchmark
from evaluation.grading import GRADERS

from .conftest import REAL_FILES


def as_model_writes(answer: str) -> str:
    return f"Let me work through it step by step. ... so the answer is \\boxed{{{answer}}}."


def other_answer(answers: list[str], i: int) -> str:
    """The next row's answer that is spelled differently from row i's."""
    j = (i + 1) % len(answers)
    while answers[j].strip() == answers[i].strip():
        j = (j + 1) % len(answers)
    return answers[j]


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_grader_accepts_gold_and_rejects_other_rows(shared_data: Path, name: str) -> None:
    lb = load_benchmark(name, data_dir=shared_data)
    grader = GRADERS[lb.benchmark.grader]
    answers = [p.answer for p in lb.problems]
    accept_fail, reject_fail = [], []
    for i, p in enumerate(lb.problems):
        g = grader.grade(as_model_writes(p.answer), p.answer, 5.0)
        if not g.correct:
            accept_fail.append(f"{p.id}: gold {p.answer!r} extracted {g.extracted!r} ({g.error})")
        wrong = other_answer(answers, i)
        g = grader.grade(as_model_writes(wrong), p.answer, 5.0)
        if g.correct:
            reject_fail.append(f"{p.id}: gold {p.answer!r} accepted {wrong!r}")
    n = len(lb.problems)
    acc, rej = 1 - len(accept_fail) / n, 1 - len(reject_fail) / n
    report = (f"{name}: gold accepted {n - len(accept_fail)}/{n} ({100 * acc:.2f}%), other row's answer rejected "
              f"{n - len(reject_fail)}/{n} ({100 * rej:.2f}%)\n"
              + "".join(f"  not accepted: {x}\n" for x in accept_fail)
              + "".join(f"  not rejected: {x}\n" for x in reject_fail))
    print(report)
    assert acc >= 0.99 and rej >= 0.99, report


@pytest.mark.parametrize("name,raw_field", [("gsm8k", "answer"), ("aime24", "source_answer")])
def test_source_spellings_are_accepted(shared_data: Path, name: str, raw_field: str) -> None:
    """Answers as the sources spell them - GSM8K with thousands separators ("2,125"), AIME zero-padded ("025") - are
    what a model often writes; they must match the normalised gold."""
    rows = [json.loads(x) for x in (shared_data / REAL_FILES[name]).read_text().splitlines() if x.strip()]
    gold = {p.id: p.answer for p in load_benchmark(name, data_dir=shared_data).problems}
    grader = GRADERS["math"]
    fails = [f"{r['id']}: {r[raw_field]!r} vs gold {gold[r['id']]!r}" for r in rows
             if not grader.grade(as_model_writes(str(r[raw_field])), gold[r["id"]], 5.0).correct]
    differing = sum(str(r[raw_field]) != gold[r["id"]] for r in rows)
    print(f"{name}: {len(rows) - len(fails)}/{len(rows)} source spellings accepted ({differing} differ from the gold)")
    assert differing > 0 and not fails, fails
