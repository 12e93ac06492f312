"""What every reward shares: the batched call contract, input checks, and the reasoning/answer split.

A reward scores a batch of ``N`` responses at once::

    reward(responses, *, answers, references) -> list[float]          # (N,)
    reward.score(responses, *, answers, references) -> Scores         # values (N,) + reasons (N,)

``answers`` are the gold final answers (outcome rewards use them), ``references`` the reference solutions (dense rewards
use them); each reward ignores the other list, but both must have one entry per response so a driver can pass the same
three lists to every reward. ``Scores.reasons[i]`` says why item ``i`` scored 0 when it could not be scored (no answer
found, timed out, unparsable), else ``None``; it is for logging, never for training.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from lampo.registry import Registry


@dataclass
class Scores:
    """One batch of scores: ``values`` (N,) floats and ``reasons`` (N,) ``str | None`` (why an item failed)."""

    values: list[float]
    reasons: list[str | None]


def check_batch(responses: list[str], answers: list[str], references: list[str]) -> None:
    """Raise a ``ValueError``/``TypeError`` that says what is wrong when the three lists do not line up."""
    for name, seq in (("responses", responses), ("answers", answers), ("references", references)):
        if isinstance(seq, str) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list of str (one per response), got {type(seq).__name__}")
        for i, x in enumerate(seq):
            if not isinstance(x, str):
                raise TypeError(f"{name}[{i}] is {type(x).__name__}, expected str; pass '' for a missing entry")
    if not (len(responses) == len(answers) == len(references)):
        raise ValueError(
            f"got {len(responses)} responses, {len(answers)} answers and {len(references)} references; "
            "pass one answer and one reference per response (repeat a prompt's entries for each of its G samples)"
        )


class Reward(ABC):
    """Base class: subclasses implement :meth:`score`; calling the reward returns only the values."""

    name: str = ""

    @abstractmethod
    def score(self, responses: list[str], *, answers: list[str], references: list[str]) -> Scores:
        """Score a batch; see the module docstring."""

    def __call__(self, responses: list[str], *, answers: list[str], references: list[str]) -> list[float]:
        return self.score(responses, answers=answers, references=references).values


REWARDS: Registry[type[Reward]] = Registry("reward")  # name -> reward class; filled by the modules of this package


# Where the final answer starts: the last \boxed / \fbox, "answer is" phrase or GSM8K-style "#### n".
_FINAL_ANSWER = re.compile(r"\\(?:boxed|fbox)\b|(?:final answer|the answer) (?:is|:)|####", re.IGNORECASE)
# An unfinished lead-in left before the answer: "So the answer is", "Therefore, the final answer is: $".
_LEAD_IN = re.compile(r"[^.!?\n]*\banswer\b[^.!?\n]*$", re.IGNORECASE)


def reasoning_part(text: str) -> str:
    """The text before the final answer (the last ``\\boxed``/``\\fbox``, "the answer is" or "####"), stripped,
    without the unfinished sentence that leads into the answer ("So the answer is").

    Dense rewards compare the reasoning with the reference solution; cutting the answer off keeps a dense reward
    from re-counting the outcome. A response with no recognisable final answer is all reasoning.
    """
    last = None
    for last in _FINAL_ANSWER.finditer(text):  # noqa: B007 - keeps the last match
        pass
    if last is None:
        return text.strip()
    head = text[: last.start()]
    lead = _LEAD_IN.search(head[-300:])
    if lead is not None:
        head = head[: len(head) - len(head[-300:]) + lead.start()]
    return head.strip()
