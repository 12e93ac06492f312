"""Multiple-choice outcome reward (GPQA-style): 1.0 when the response's chosen letter is the gold letter.

Not in the paper (its benchmarks are math); this is the outcome reward for question sets whose answer is a letter.
"""
from __future__ import annotations

import re

from lampo.rewards.base import REWARDS, Reward, Scores, check_batch


def _letter(fragment: str, letters: str) -> str | None:
    """The letter that ``fragment`` names: "C", "(C)", "C)", "\\text{C}", "C. some option text"; else None."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", fragment).strip().strip("$*").strip()
    m = re.match(rf"^\(?([{letters}])\)?(?:$|[\s.:,)])", s)
    return m.group(1) if m else None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter the response picked, or None.

    Order: the last ``\\boxed{...}`` that names a letter; else the last "answer is X" / "answer: (X)" / "correct
    option is X" phrase; else the last parenthesised letter "(X)"; else the whole response when it is just a letter.
    Letters are matched as capitals only, so the article "a" is never read as option A.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_choice expects str, got {type(text).__name__}")
    if not letters or not letters.isalpha() or not letters.isupper():
        raise ValueError(f"letters={letters!r} must be capital letters, e.g. 'ABCD'")
    for m in reversed(list(re.finditer(r"\\boxed\s*\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", text))[-8:]):
        got = _letter(m.group(1), letters)
        if got:
            return got
    phrase = re.compile(rf"(?:answer|correct (?:option|choice))(?:\s+is|\s*:)?[\s:*]*(?:option\s+|choice\s+)?"
                        rf"\(?\$?([{letters}])\b", re.IGNORECASE)
    found = [m.group(1) for m in phrase.finditer(text) if m.group(1).isupper()]
    if found:
        return found[-1]
    parens = re.findall(rf"\(([{letters}])\)", text)
    if parens:
        return parens[-1]
    return _letter(text, letters) if len(text.strip()) <= 4 else None


@REWARDS.register("choice")
class ChoiceReward(Reward):
    """1.0 when :func:`extract_choice` equals the gold letter (given as "C" or "(C)"), else 0.0.

    ``letters``: the option letters (default "ABCD"). Ignores ``references``.
    """

    name = "choice"

    def __init__(self, *, letters: str = "ABCD"):
        extract_choice("", letters)  # validates letters
        self.letters = letters

    def score(self, responses: list[str], *, answers: list[str], references: list[str]) -> Scores:
        check_batch(responses, answers, references)
        values, reasons = [], []
        for i, (resp, gold) in enumerate(zip(responses, answers)):
            g = _letter(gold, self.letters)
            if g is None:
                raise ValueError(f"answers[{i}]={gold!r} is not one of the option letters {self.letters!r}")
            pred = extract_choice(resp, self.letters)
            values.append(1.0 if pred == g else 0.0)
            reasons.append("no option letter found" if pred is None else None)
        return Scores(values, reasons)
