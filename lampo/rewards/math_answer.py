"""Math outcome reward: extract the final answer, compare it with the gold answer through math-verify.

    reward = MathReward(timeout_s=5.0)
    reward(["... so the answer is \\boxed{\\frac{1}{2}}"], answers=["0.5"], references=[""])   # [1.0]

Pipeline for one item:

1. :func:`extract_answer`: the last ``\\boxed``/``\\fbox``, else "the answer is X", else the last number;
2. :func:`normalize_answer` on prediction and gold (``\\dfrac``, ``\\left``, thin spaces, thousands separators,
   degrees, percent, trailing units, ``\\text{...}`` answers);
3. a cheap exact path: equal strings, two plain numbers compared as exact fractions, a word answer ("Evelyn", "(C)")
   compared case-insensitively;
4. otherwise math-verify (``parse`` + ``verify``) in a separate worker process with a time bound
   (:mod:`lampo.rewards.verify_worker`).

Why a worker process: math-verify bounds its own time with ``signal.alarm``, which only works in the main thread and
cannot interrupt a long C-level computation (a big-integer power); the worker runs math-verify in its own main thread
under a float ``setitimer`` deadline, and the caller kills and restarts it if even that does not return. So a call from
any thread, on any input, returns within about ``timeout_s`` + 1 s and scores 0 with a reason.

The paper does not specify answer matching; this module is our choice. Extraction and equivalence are shared with the
evaluation package, which grades benchmarks with the same two functions.
"""
from __future__ import annotations

import logging
import re
from fractions import Fraction

from lampo.rewards.base import REWARDS, Reward, Scores, check_batch
from lampo.rewards.verify_worker import shared_worker

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # longer "answers" are not answers; scoring them 0 keeps pathological inputs cheap

# ----------------------------------------------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_MAX_BOXES_TRIED = 8
_MAX_BOX_SCAN = 20_000
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _balanced(text: str, open_at: int) -> str | None:
    """Content of the brace group whose ``{`` is at ``open_at``; None when it never closes (truncated response)
    or runs past ``_MAX_BOX_SCAN`` characters."""
    depth = 0
    for i in range(open_at, min(len(text), open_at + _MAX_BOX_SCAN)):
        c = text[i]
        if c == "\\":  # skip escaped braces \{ \}
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    # only the last few boxes are tried, each scan bounded, so 100 kB of unclosed "\\boxed{" stays linear
    for m in list(_BOX.finditer(text))[-_MAX_BOXES_TRIED:][::-1]:
        if m.group(1) is not None:
            content = _balanced(text, m.end() - 1)
        else:  # "\boxed 5": the next token
            tok = re.match(r"\s*([^\s$]+)", text[m.end():])
            content = tok.group(1) if tok else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _answer_phrase(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS.finditer(text):  # noqa: B007 - keeps the last match
        pass
    if last is None:
        return None
    rest = text[last.end():]
    # the answer runs to the end of the line or of the sentence ("." followed by a space or the end, not "3.5")
    m = re.match(r"(.*?)(?:\.\s|\.$|\n|$)", rest)
    ans = (m.group(1) if m else rest).strip().strip("$").strip()
    return ans.rstrip(".").strip() or None


def extract_answer(text: str) -> str | None:
    """The model's final answer in ``text``, or None when there is none.

    Order: the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces (an unclosed one, as in a truncated
    response, is skipped); else what follows the last "the answer is" / "final answer:" up to the end of the
    sentence or line; else the last number (integers, decimals, ``1,234``-style thousands, ``a/b``).
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects str, got {type(text).__name__}")
    ans = _last_boxed(text)
    if ans is None:
        ans = _answer_phrase(text)
    if ans is None:
        nums = _NUMBER.findall(text)
        ans = nums[-1] if nums else None
    return ans


# -------------------------------------------------------------------------------------------------- normalisation

_SPACES = re.compile(r"(?<!\\)\\[,;:! ]|\\quad|\\qquad|~")
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|operatorname)\s*"
_WHOLE_TEXT = re.compile(rf"^{_TEXT_CMD}\{{([^{{}}]*)\}}$")
_TRAILING_UNIT = re.compile(rf"^(.*?[0-9}}a-zA-Z)])\s*{_TEXT_CMD}\{{\s*[a-zA-Z][^{{}}]*\}}(?:\^\{{?\d\}}?)?$")
# plain unit words after a number: "18 dollars", "18 eggs per day", "3 cm^2" (the first word must be a unit or a word
# of 3+ letters that is not mathematics, so "3 pi" and "2 x" keep their meaning)
_TRAILING_WORDS = re.compile(r"^(.*?[0-9}).])\s+([a-zA-Z]+)((?:\s+[a-zA-Z]+)*)(?:\s*\^\s*\{?[23]\}?)?$")
_SHORT_UNITS = {"cm", "mm", "km", "kg", "mg", "ml", "ft", "yd", "mi", "hr", "lb", "oz"}
_MATH_WORDS = {"pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "mod", "and", "or", "for", "with", "where",
               "sqrt", "inf", "infinity", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh"}
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
_TEXT_ANSWER = re.compile(r"^\(?[a-zA-Z][a-zA-Z '\-]*\)?$")


def normalize_answer(ans: str) -> str:
    """A canonical spelling of a short answer string; both prediction and gold go through it.

    Removes ``$``, ``\\$``, ``\\left``/``\\right``, LaTeX spacing (``\\!``, ``\\,``), a trailing period, degree marks,
    percent signs, a ``\\text{...}`` wrapper around the whole answer, and trailing unit text (``5.4 \\text{ cents}``,
    ``864 \\mbox{ inches}^2``, ``18 eggs per day``, ``3 cm^2``); turns ``\\dfrac``/``\\tfrac`` into ``\\frac``, a
    Unicode minus into ``-``, and ``1,234`` (or ``1,\\!234``) into ``1234`` (a comma-separated list with spaces,
    ``1, 234``, stays a list).
    Departure: percent is dropped, so "50\\%" and "50" are the same answer.
    """
    s = ans.strip().replace("\u2212", "-")
    s = re.sub(r"(\d),\\!\s*(?=\d{3})", r"\1", s)  # 10,\!080 -> 10080 (LaTeX thousands separator)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\s*|\\right\s*", "", s)
    s = s.replace("\\displaystyle", "")
    s = _SPACES.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    m = _TRAILING_UNIT.match(s)
    if m:
        s = m.group(1).strip()
    s = re.sub(r"\s*\\text\s*\{\s*degrees?\s*\}$|\s+degrees?$", "", s)
    m = _TRAILING_WORDS.match(s)
    if m and m.group(2).lower() not in _MATH_WORDS and (len(m.group(2)) >= 3 or m.group(2).lower() in _SHORT_UNITS):
        s = m.group(1).strip()
    m = _WHOLE_TEXT.match(s)
    if m:
        s = m.group(1).strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s.strip()


def _plain_number(s: str) -> Fraction | None:
    return Fraction(s) if _PLAIN_NUMBER.match(s) else None


def _text_answer(s: str) -> str | None:
    """Lower-cased word answer ("Evelyn", "(C)", "even", "right angle"), or None for anything that may be
    mathematics ("x", "p - q", "ab": single letters are variables)."""
    if not _TEXT_ANSWER.match(s):
        return None
    core = s.strip("()").strip().lower()
    if len(core) == 1 and s.startswith("(") and s.endswith(")"):
        return core  # a choice letter
    words = re.split(r"[\s\-]+", core)
    if all(len(w) >= 2 for w in words) and any(len(w) >= 3 for w in words):
        return core
    return None


# ---------------------------------------------------------------------------------------------------- equivalence


def is_equivalent(pred: str, gold: str, timeout_s: float = 5.0) -> tuple[bool, str | None]:
    """Whether the extracted answer ``pred`` equals the gold answer ``gold``; returns (correct, reason).

    ``reason`` is None when the comparison ran (correct or not) and says why otherwise (empty prediction, too long,
    unparsable, timed out, worker crashed): a caller logs it and scores 0. Safe from any thread; returns within
    about ``timeout_s`` + 1 s whatever the input.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        raise TypeError(f"is_equivalent expects two str, got {type(pred).__name__} and {type(gold).__name__}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if not pred.strip():
        return False, "empty answer"
    if len(pred) > MAX_ANSWER_CHARS:
        return False, f"answer has {len(pred)} characters (> {MAX_ANSWER_CHARS}); not compared"
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not g:
        return False, f"gold answer {gold!r} is empty after normalisation"
    if p == g:
        return True, None
    pn, gn = _plain_number(p), _plain_number(g)
    if pn is not None and gn is not None:
        return pn == gn, None
    gt = _text_answer(g)
    if gt is not None:  # a word answer is matched as a word, never by sympy (which reads "east" as e*a*s*t)
        return bool(_TEXT_ANSWER.match(p)) and p.strip("()").strip().lower() == gt, None
    return shared_worker().verify(p, g, timeout_s)


# --------------------------------------------------------------------------------------------------------- reward


@REWARDS.register("math")
class MathReward(Reward):
    """Outcome reward: 1.0 when the response's final answer equals the gold answer, else 0.0. Ignores ``references``.

    ``timeout_s`` bounds the comparison of one item (seconds, float). Items that cannot be scored (no answer,
    timeout, unparsable) score 0 and carry a reason (logged at DEBUG; timeouts and worker crashes at WARNING).
    """

    name = "math"

    def __init__(self, *, timeout_s: float = 5.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 (seconds per item)")
        self.timeout_s = float(timeout_s)

    def score(self, responses: list[str], *, answers: list[str], references: list[str]) -> Scores:
        check_batch(responses, answers, references)
        values: list[float] = []
        reasons: list[str | None] = []
        for i, (resp, gold) in enumerate(zip(responses, answers)):
            pred = extract_answer(resp)
            if pred is None:
                ok, why = False, "no final answer found"
            else:
                ok, why = is_equivalent(pred, gold, self.timeout_s)
            if why is not None:
                log.debug("math reward item %d scored 0: %s", i, why)
            values.append(1.0 if ok else 0.0)
            reasons.append(why)
        return Scores(values, reasons)
