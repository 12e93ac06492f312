"""Graders, by name: thin adapters over the project's one answer checker in :mod:`lampo.rewards`.

Evaluation never grades on its own: ``math`` uses ``lampo.rewards.math_answer.extract_answer`` and ``is_equivalent``
(the same code that scores RL rewards, so an evaluation accuracy and a training reward mean the same thing), ``choice``
uses ``lampo.rewards.choice.extract_choice``. The imports are lazy so that loading benchmarks does not pull in the
symbolic-math stack.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lampo.registry import Registry


@dataclass(frozen=True)
class Grade:
    """The answer pulled out of a response (None: none found), whether it matches the gold, and why not when the
    checker itself failed (e.g. a timeout)."""

    extracted: str | None
    correct: bool
    error: str | None = None


class Grader:
    def grade(self, response: str, gold: str, timeout_s: float) -> Grade:
        raise NotImplementedError

    def equivalent(self, a: str, b: str, timeout_s: float) -> bool:
        """Whether two extracted answers are the same answer (used to group votes for maj@k)."""
        raise NotImplementedError


GRADERS: Registry[Grader] = Registry("grader")


class MathGrader(Grader):
    """Final answer in ``\\boxed{}`` (or the extractor's other patterns), compared to the gold answer symbolically."""

    def grade(self, response: str, gold: str, timeout_s: float) -> Grade:
        from lampo.rewards.math_answer import extract_answer

        pred = extract_answer(response)
        if pred is None:
            return Grade(None, False, None)
        ok, err = _compare(pred, gold, timeout_s)
        return Grade(pred, ok, err)

    def equivalent(self, a: str, b: str, timeout_s: float) -> bool:
        return a.strip() == b.strip() or _compare(a, b, timeout_s)[0]


@lru_cache(maxsize=1 << 16)
def _compare(pred: str, gold: str, timeout_s: float) -> tuple[bool, str | None]:
    """``is_equivalent``, memoised: the k samples of a problem often repeat one answer, and each uncached comparison
    may cost a round trip to the math-verify worker."""
    from lampo.rewards.math_answer import is_equivalent

    ok, err = is_equivalent(pred, gold, timeout_s=timeout_s)
    return bool(ok), err


class ChoiceGrader(Grader):
    """A multiple-choice letter (A-D), compared to the gold letter exactly."""

    def __init__(self, letters: str = "ABCD"):
        self.letters = letters

    def grade(self, response: str, gold: str, timeout_s: float) -> Grade:
        from lampo.rewards.choice import extract_choice

        pred = extract_choice(response, letters=self.letters)
        return Grade(pred, pred is not None and pred == gold.strip().upper(), None)

    def equivalent(self, a: str, b: str, timeout_s: float) -> bool:
        return a.strip().upper() == b.strip().upper()


GRADERS.register("math")(MathGrader())
GRADERS.register("choice")(ChoiceGrader())
