"""Benchmark definitions: where the rows come from, how a row becomes a :class:`Problem`, and which grader checks it.

``BENCHMARKS`` is a registry (duplicate names refused). A benchmark is named on the command line either alone
(``math500``: the file in ``data_dir``, else the hub default) or with its source (``gpqa_diamond=/data/gpqa.csv``,
``aime24=hub:HuggingFaceH4/aime_2024@train``). Each definition maps the canonical fields ``id``, ``problem``,
``answer`` (plus breakdown fields such as ``subject``/``level``) to the first of several source field names that a
row has, so the same definition reads our normalised JSON Lines and the hub's own layout.

Row problems (no problem text, empty answer, duplicate id, ...) are reported as :class:`~evaluation.data.BadRow` with
``file:line`` and skipped; the rest is evaluated.

Where we fill a gap: the LamPO paper does not give its evaluation prompt. We use the common instruction of the
reasoning-model literature ("Please reason step by step, and put your final answer within \\boxed{}."), appended to the
problem in the user turn, and for GPQA-Diamond the same instruction asking for the option letter in the box.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.data import (
    LOCAL_SUFFIXES,
    BadRow,
    BenchmarkDataError,
    HubSource,
    parse_hub,
    read_hub,
    read_local,
)
from evaluation.tiny_task import TINY_HELDOUT_DEFAULT, make_split
from lampo.registry import Registry
from lampo.seeds import derive_seed

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of your final answer (A, B, C or D) within \\boxed{}.")


class RowError(ValueError):
    """One row cannot become a problem; the message says which field is wrong."""


@dataclass(frozen=True)
class Problem:
    """One benchmark item. ``text`` is what the user turn says (problem plus instruction; for ``chat=False``
    benchmarks the raw problem text); ``answer`` is the gold answer the grader compares to; ``meta`` holds breakdown
    fields (``subject``, ``level``) and, for multiple choice, the shuffled ``choices``."""

    id: str
    text: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


Builder = Callable[["Benchmark", dict[str, Any], int], Problem]  # (definition, row, seed) -> Problem


@dataclass(frozen=True)
class Benchmark:
    name: str
    grader: str  # a name in evaluation.grading.GRADERS
    build: Builder  # (definition, row, seed) -> Problem; raises RowError
    local_names: tuple[str, ...] = ()  # files looked for in data_dir, in order
    hub: HubSource | None = None  # default source when there is no data_dir
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)  # canonical -> candidate source names
    breakdown: tuple[str, ...] = ()  # meta fields to break accuracy down by
    instruction: str = BOXED_INSTRUCTION
    chat: bool = True  # False: the raw text is the prompt (no chat template, no instruction)
    access_hint: str = ""  # how to get the data when it is not there (gated sets)
    generate: Callable[[int | None, int], list[dict[str, Any]]] | None = None  # synthetic rows (limit, seed)

    def field_value(self, row: dict[str, Any], name: str) -> Any:
        """The row's value for canonical field ``name`` (first candidate present and not None), or None."""
        for key in self.fields.get(name, (name,)):
            if key in row and row[key] is not None:
                return row[key]
        return None

    def required_text(self, row: dict[str, Any], name: str) -> str:
        v = self.field_value(row, name)
        cands = ", ".join(repr(c) for c in self.fields.get(name, (name,)))
        if v is None:
            raise RowError(f"missing {name} (looked for the field {cands})")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise RowError(f"{name} must be text or a number, got {type(v).__name__}")
        text = str(v).strip()
        if not text:
            raise RowError(f"{name} is empty")
        return text


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def _register(b: Benchmark) -> Benchmark:
    return BENCHMARKS.register(b.name)(b)


# --------------------------------------------------------------------------------------------------------------------
# row builders


def _meta(b: Benchmark, row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in b.breakdown:
        v = b.field_value(row, name)
        if v is not None:
            out[name] = v
    return out


def _row_id(b: Benchmark, row: dict[str, Any]) -> str | None:
    v = b.field_value(row, "id")
    return None if v is None or str(v).strip() == "" else str(v).strip()


def build_math(b: Benchmark, row: dict[str, Any], seed: int = 0) -> Problem:
    problem = b.required_text(row, "problem")
    answer = b.required_text(row, "answer")
    text = problem if not b.chat else f"{problem}\n{b.instruction}"
    return Problem(_row_id(b, row) or "", text, answer, _meta(b, row))


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def build_gsm8k(b: Benchmark, row: dict[str, Any], seed: int = 0) -> Problem:
    """GSM8K's source answer is a full solution ending in ``#### N``; the gold is N without thousands separators."""
    p = build_math(b, row, seed)
    answer = p.answer.rsplit("####", 1)[-1].strip()
    answer = _THOUSANDS.sub("", answer)
    if not answer:
        raise RowError("answer has nothing after '####'")
    return Problem(p.id, p.text, answer, p.meta)


def shuffled_choices(question: str, correct: str, incorrect: list[str], seed: int = 0) -> tuple[list[str], str]:
    """The four options in a fixed pseudo-random order and the correct letter.

    The order depends only on the question text and ``seed`` (a SHA-256 of both seeds the shuffle), so it is the same
    on every machine and run, and does not change when rows are reordered or filtered.
    """
    options = [correct, *incorrect]
    order = list(range(len(options)))
    random.Random(derive_seed(seed, "choices", question)).shuffle(order)
    shuffled = [options[i] for i in order]
    return shuffled, "ABCD"[order.index(0)]


def build_gpqa(b: Benchmark, row: dict[str, Any], seed: int = 0) -> Problem:
    question = b.required_text(row, "problem")
    correct = b.required_text(row, "answer")
    incorrect = [b.required_text(row, f"incorrect_{i}") for i in (1, 2, 3)]
    if len({correct, *incorrect}) < 4:
        raise RowError("the four options are not all different")
    choices, letter = shuffled_choices(question, correct, incorrect, seed)
    body = "\n".join(f"{L}) {c}" for L, c in zip("ABCD", choices))
    text = f"{question}\n\n{body}\n\n{b.instruction}"
    return Problem(_row_id(b, row) or "", text, letter, {**_meta(b, row), "choices": choices})


def _tiny_rows(limit: int | None, seed: int, ops: int = 3) -> list[dict[str, Any]]:
    """The tiny task's held-out split: ``limit`` problems, else :data:`~evaluation.tiny_task.TINY_HELDOUT_DEFAULT`
    (what ``data.tiny_heldout_size`` defaults to)."""
    n = limit if limit is not None else TINY_HELDOUT_DEFAULT
    name = "tiny" if ops == 3 else f"tiny{ops}"
    return [{**r, "where": f"{name}[{i}]"} for i, r in enumerate(make_split("heldout", n, seed=seed, ops=ops))]


def _tiny5_rows(limit: int | None, seed: int) -> list[dict[str, Any]]:
    """The harder tiny variant's held-out split: five operations per problem (``data.tiny_ops=5``)."""
    return _tiny_rows(limit, seed, ops=5)

# --------------------------------------------------------------------------------------------------------------------
# the registry

_MATH_FIELDS = {
    "id": ("id", "unique_id", "ID"),
    "problem": ("problem", "question", "Problem", "Question"),
    "answer": ("answer", "Answer"),
    "subject": ("subject", "type"),
    "level": ("level",),
}

_register(Benchmark(
    "math500", "math", build_math, ("math500.jsonl", "math500.parquet", "math500.csv", "math500.json"),
    HubSource("HuggingFaceH4/MATH-500", None, "test"), _MATH_FIELDS, breakdown=("subject", "level")))
_register(Benchmark(
    "aime24", "math", build_math, ("aime24.jsonl", "aime24.parquet", "aime24.csv", "aime24.json"),
    HubSource("HuggingFaceH4/aime_2024", None, "train"), _MATH_FIELDS))
_register(Benchmark(
    "aime25", "math", build_math, ("aime25.jsonl", "aime25.parquet", "aime25.csv", "aime25.json"),
    HubSource("math-ai/aime25", None, "test"), _MATH_FIELDS))
_register(Benchmark(
    "gsm8k", "math", build_gsm8k, ("gsm8k_test.jsonl", "gsm8k.jsonl", "gsm8k_test.parquet", "gsm8k.parquet"),
    HubSource("openai/gsm8k", "main", "test"),
    {**_MATH_FIELDS, "answer": ("answer_normalized", "answer", "Answer")}))
_register(Benchmark(
    "gpqa_diamond", "choice", build_gpqa,
    ("gpqa_diamond.csv", "gpqa_diamond.jsonl", "gpqa_diamond.parquet", "gpqa_diamond.json"),
    HubSource("Idavidrein/gpqa", "gpqa_diamond", "train"),
    {"id": ("Record ID", "id"), "problem": ("Question", "question", "problem"),
     "answer": ("Correct Answer", "correct_answer"),
     "incorrect_1": ("Incorrect Answer 1", "incorrect_answer_1"),
     "incorrect_2": ("Incorrect Answer 2", "incorrect_answer_2"),
     "incorrect_3": ("Incorrect Answer 3", "incorrect_answer_3"),
     "domain": ("High-level domain", "domain")},
    breakdown=("domain",), instruction=CHOICE_INSTRUCTION,
    access_hint=(
        "GPQA-Diamond is gated and not shipped with LamPO (its authors ask that it not be posted in plain text). "
        "Either accept its terms at https://huggingface.co/datasets/Idavidrein/gpqa and log in (`hf auth login` or "
        "HF_TOKEN), or supply a local copy: `--benchmarks gpqa_diamond=/path/gpqa_diamond.csv` or a file "
        "gpqa_diamond.csv in --data-dir, with the columns 'Question', 'Correct Answer', 'Incorrect Answer 1', "
        "'Incorrect Answer 2', 'Incorrect Answer 3'.")))
_register(Benchmark(
    "tiny", "math", build_math, fields=_MATH_FIELDS, chat=False, generate=_tiny_rows))
_register(Benchmark(
    "tiny5", "math", build_math, fields=_MATH_FIELDS, chat=False, generate=_tiny5_rows))


# --------------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedBenchmark:
    benchmark: Benchmark
    problems: list[Problem]
    bad_rows: list[BadRow]
    source: str


def parse_spec(spec: str) -> tuple[Benchmark, str | None]:
    """``NAME`` or ``NAME=SOURCE`` -> (definition, source or None). Unknown names list the known ones."""
    name, _, source = spec.partition("=")
    name = name.strip()
    if name not in BENCHMARKS:
        known = ", ".join(sorted(BENCHMARKS))
        raise KeyError(f"unknown benchmark {name!r}; known: {known} (a file of your own: NAME=PATH with a known NAME)")
    return BENCHMARKS[name], (source.strip() or None)


def _resolve_source(b: Benchmark, source: str | None, data_dir: str | Path | None) -> str:
    if source is not None:
        return source
    if data_dir is not None and b.local_names:
        d = Path(data_dir)
        for fname in b.local_names:
            if (d / fname).is_file():
                return str(d / fname)
        tried = ", ".join(str(d / f) for f in b.local_names)
        raise BenchmarkDataError(
            f"{b.name}: none of {tried} exists. Put the file there, name it with {b.name}=PATH "
            f"(any of {', '.join(LOCAL_SUFFIXES)}), or leave data_dir unset to load {b.hub} from the hub. "
            f"{b.access_hint}".rstrip())
    if b.hub is None:
        raise BenchmarkDataError(f"{b.name}: no data_dir and no hub default; name a file with {b.name}=PATH")
    return str(b.hub)


def load_benchmark(spec: str, *, data_dir: str | Path | None = None, limit: int | None = None,
                   seed: int = 0) -> LoadedBenchmark:
    """Read a benchmark's rows, turn them into problems, and report every skipped row.

    ``limit`` keeps the first N usable problems. ``seed`` only affects multiple-choice option order and synthetic
    rows; :func:`evaluation.run.evaluate` leaves it at 0 so that a benchmark is the same fixed set in every run.
    A SOURCE that is not an existing path and looks like ``ORG/NAME`` is read from the hub, as is ``hub:...``.
    Raises :class:`BenchmarkDataError` when nothing usable can be read.
    """
    b, source = parse_spec(spec)
    if b.generate is not None and source is None:
        rows, bad, src = b.generate(limit, seed), [], f"{b.name} (generated, seed {seed})"
    else:
        src = _resolve_source(b, source, data_dir)
        if src.startswith("hub:") or (not Path(src).exists() and not Path(src).suffix and src.count("/") == 1):
            rows, bad = read_hub(parse_hub(src), b.access_hint), []
        else:
            try:
                rows, bad = read_local(src)
            except BenchmarkDataError as e:
                raise BenchmarkDataError(f"{b.name}: {e}. {b.access_hint}".rstrip()) from None
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for i, row in enumerate(rows):
        where = str(row.get("where", f"{src}[{i}]"))
        try:
            p = b.build(b, row, seed)
        except RowError as e:
            bad.append(BadRow(where, str(e)))
            continue
        if not p.id:
            p = Problem(f"{b.name}-{i}", p.text, p.answer, p.meta)
        if p.id in seen:
            bad.append(BadRow(where, f"duplicate id {p.id!r} (first at {seen[p.id]})"))
            continue
        seen[p.id] = where
        problems.append(p)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        first = "; ".join(map(str, bad[:3])) or "the source has no rows"
        raise BenchmarkDataError(f"{b.name}: no usable problem in {src} ({first})")
    return LoadedBenchmark(b, problems, bad, src)
