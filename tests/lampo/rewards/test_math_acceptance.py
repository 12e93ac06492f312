"""Acceptance of the math reward on real benchmark answers (../shared/data): every gold answer, written as a model
would, must score 1 (>= 99% of rows), and another row's answer must score 0 (>= 99%).

Acceptance is measured for the gold string in ``\\boxed{}``, after "The final answer is", rewritten the way models
often spell it (:func:`model_spelling`: ``a/b`` for numeric fractions, no ``\\left``/``\\right``/spaces/``\\!``,
``°`` for ``^\\circ``, bare words for ``\\text{...}``; it shares no code with the reward's own normalisation), and
(MATH-500, GSM8K) as the dataset's whole reference solution.
Rejection pairs each row with the next row whose answer differs after normalisation (identical answers are skipped;
a pair that is still mathematically equivalent, like "x=5" and "5", counts as a failure here and is printed).
Run with ``-s`` to see the figures and every failure.
"""
import json
import os
import re
import time
from pathlib import Path

import pytest

from lampo.rewards.math_answer import MathReward, normalize_answer

DATA = Path(os.environ.get("LAMPO_SHARED_DATA", Path(__file__).resolve().parents[3] / "../shared/data"))
SETS = ["math500", "aime24", "aime25", "gsm8k_test"]
# sets whose reference solutions end with the answer (MATH: \\boxed{}, GSM8K: "#### n"); AIME's are community
# write-ups that often do not
SOLUTION_SETS = {"math500", "gsm8k_test"}
TEMPLATES = ["Let me work it out step by step... so the answer is \\boxed{%s}.", "The final answer is $%s$."]


def model_spelling(answer: str) -> str:
    """The gold answer spelt as a model often writes it."""
    s = re.sub(r"(?<!\d)(?<!\d )\\[dt]?frac\{(\d+)\}\{(\d+)\}", r"\1/\2", answer)  # \frac{3}{4} -> 3/4
    s = re.sub(r"(?<!\d)(?<!\d )\\[dt]?frac(\d)(\d)", r"\1/\2", s)  # \frac43 -> 4/3
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = re.sub(r"\^\\circ|\^\{\\circ\}", "°", s)
    s = re.sub(r"\\text\{\s*(\(?[A-Za-z]+\)?)\s*\}", r"\1", s)
    return s.replace("\\$", "$").replace(" ", "")


def load(name: str) -> list[dict]:
    path = DATA / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent; set LAMPO_SHARED_DATA to the folder that holds the benchmark .jsonl files")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def other_answer(rows: list[dict], i: int) -> str | None:
    key = normalize_answer(rows[i]["answer"]).replace(" ", "")
    for k in range(1, len(rows)):
        cand = rows[(i + k) % len(rows)]["answer"]
        if normalize_answer(cand).replace(" ", "") != key:
            return cand
    return None


@pytest.mark.parametrize("name", SETS)
def test_gold_answers_accepted_and_other_answers_rejected(name):
    rows = load(name)
    golds = [r["answer"] for r in rows]
    reward = MathReward(timeout_s=5.0)
    t = time.monotonic()
    report = []
    forms = [(f"accept {t[-22:]!r}", [t % g for g in golds]) for t in TEMPLATES]
    forms.append(("accept model spelling", [TEMPLATES[0] % model_spelling(g) for g in golds]))
    if name in SOLUTION_SETS:  # a whole worked solution, answer extracted from real text
        forms.append(("accept reference solution", [r["solution"] for r in rows]))
    for what, responses in forms:
        out = reward.score(responses, answers=golds, references=[""] * len(rows))
        fails = [(r["id"], r["answer"], resp[-40:], why)
                 for r, resp, v, why in zip(rows, responses, out.values, out.reasons) if v != 1.0]
        rate = 1 - len(fails) / len(rows)
        report.append((what, rate, len(rows) - len(fails), len(rows), fails))
    pairs = [(r, o) for i, r in enumerate(rows) if (o := other_answer(rows, i)) is not None]
    out = reward.score([TEMPLATES[0] % o for _, o in pairs], answers=[r["answer"] for r, _ in pairs],
                       references=[""] * len(pairs))
    fails = [(r["id"], r["answer"], o) for (r, o), v in zip(pairs, out.values) if v != 0.0]
    report.append(("reject another row's answer", 1 - len(fails) / len(pairs), len(pairs) - len(fails), len(pairs),
                   fails))
    elapsed = time.monotonic() - t
    print(f"\n{name}: {len(rows)} rows, {elapsed:.1f} s")
    for what, rate, good, n, fails in report:
        print(f"  {what}: {good}/{n} = {100 * rate:.2f}%")
        for f in fails:
            print(f"    failure: {f}")
    for what, rate, good, n, fails in report:
        assert rate >= 0.99, f"{name} {what}: {good}/{n}; failures {fails[:10]}"
