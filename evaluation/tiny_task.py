"""The tiny synthetic task: left-to-right chains of single-digit additions and subtractions.

A problem reads ``What is 3+4-5+9?``; its reference solution writes every intermediate result on its own line and ends
with the answer in ``\\boxed{}``, so the project's math reward (math-verify on the last ``\\boxed{}``) grades it::

    3+4=7
    7-5=2
    2+9=11
    \\boxed{11}

Only ``+`` and ``-`` appear, so left-to-right evaluation is also Python's (and the usual) precedence, and ``eval`` of
the expression recomputes the answer. Intermediate results may be negative (``2-9=-7``).

Train and held-out problems are disjoint by construction: a problem belongs to the held-out pool exactly when a hash of
its expression falls in a fixed bucket (:func:`split_of`), whatever the seed; ``seed`` only chooses which problems of a
pool are drawn and in which order. Within a split, problems do not repeat.

The shape (three operations, operands 0-9) is chosen so that a 4-layer, width-128 model learns it within a couple of
minutes of CPU SFT only partly, leaving headroom for RL; docs/tiny_task.md records the measurements behind it. A harder
variant with longer chains (``ops=5``: five steps whose responses can be right for some steps and wrong for others;
``data.tiny_ops``, evaluation benchmark ``tiny5``) serves the estimator study (docs/study.md).

The task lives in the evaluation package, whose ``tiny`` and ``tiny5`` benchmarks are its held-out split; the pipeline
trains on its train split (``pipeline.data``) and re-exports it as :mod:`pipeline.tiny.task`.
"""
from __future__ import annotations

import hashlib
import random

from lampo.seeds import derive_seed

SPLITS = ("train", "heldout")
NUM_OPS = 3  # operations per problem (so 4 operands and 3 solution steps)
MAX_OPERAND = 9  # operands are drawn from 0..MAX_OPERAND
HELDOUT_BUCKETS = 10  # 1 in HELDOUT_BUCKETS problems of the whole space is held out
POOL_SIZE = (MAX_OPERAND + 1) ** (NUM_OPS + 1) * 2**NUM_OPS  # distinct problems overall (of the default shape)
MAX_OPS = 8  # longest chain offered (the tiny model's 256 positions hold a 9-operand problem and its solution)
# Held-out problems the ``tiny``/``tiny5`` benchmarks hold without a limit, and the default of the pipeline's
# ``data.tiny_heldout_size`` (pipeline/config.py repeats the literal: the config schema imports no project module;
# tests/pipeline/test_tiny.py checks that the two agree).
TINY_HELDOUT_DEFAULT = 200


def pool_size(ops: int = NUM_OPS) -> int:
    """Distinct problems with ``ops`` operations."""
    return (MAX_OPERAND + 1) ** (ops + 1) * 2**ops


def split_of(expression: str) -> str:
    """The split that owns ``expression`` (``"heldout"`` or ``"train"``), fixed by a hash, never by a seed."""
    digest = hashlib.sha256(expression.encode("ascii")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0 else "train"


def solve(operands: list[int], ops: list[str]) -> tuple[list[str], int]:
    """Evaluate left to right; returns the solution lines (``a+b=c`` ...) and the final value."""
    value, lines = operands[0], []
    for op, x in zip(ops, operands[1:]):
        new = value + x if op == "+" else value - x
        lines.append(f"{value}{op}{x}={new}")
        value = new
    return lines, value


def make_row(operands: list[int], ops: list[str], row_id: str) -> dict[str, str]:
    """One task row ``{"id", "problem", "answer", "solution"}`` for the given operands and operators."""
    expression = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:]))
    lines, value = solve(operands, ops)
    solution = "\n".join(lines + [f"\\boxed{{{value}}}"])
    return {"id": row_id, "problem": f"What is {expression}?", "answer": str(value), "solution": solution}


def expression_of(problem: str) -> str:
    """The arithmetic expression inside a problem statement (``What is 3+4-5+9?`` -> ``3+4-5+9``)."""
    if not (problem.startswith("What is ") and problem.endswith("?")):
        raise ValueError(f"not a tiny-task problem: {problem!r} (expected 'What is <expression>?')")
    return problem[len("What is "):-1]


def make_split(split: str, n: int, seed: int = 0, ops: int = NUM_OPS) -> list[dict[str, str]]:
    """``n`` distinct problems of ``split`` ("train" or "heldout") with ``ops`` operations each, deterministic in
    ``(split, n, seed, ops)``; the default ``ops`` gives exactly the rows it always gave.

    The first ``n`` rows of a call are the same whatever larger ``n`` is asked for, so a bigger split extends a smaller
    one. Raises ValueError for an unknown split, an ``ops`` outside 1..MAX_OPS, or an ``n`` larger than the split's
    pool.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown tiny-task split {split!r}; use one of {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer (the number of problems to generate)")
    if isinstance(ops, bool) or not isinstance(ops, int) or not 1 <= ops <= MAX_OPS:
        raise ValueError(f"ops={ops!r} must be an integer from 1 to {MAX_OPS} (operations per problem)")
    # about pool / HELDOUT_BUCKETS problems are held out; refuse sizes that would exhaust a pool
    capacity = pool_size(ops) // HELDOUT_BUCKETS // 2 if split == "heldout" else pool_size(ops) // 2
    if n > capacity:
        raise ValueError(f"n={n} is more than the {split} split supports ({capacity}); ask for fewer problems")
    name = "tiny" if ops == NUM_OPS else f"tiny{ops}"
    rng = random.Random(derive_seed(seed, "tiny_split", name, split))
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        operands = [rng.randint(0, MAX_OPERAND) for _ in range(ops + 1)]
        operators = [rng.choice("+-") for _ in range(ops)]
        row = make_row(operands, operators, f"{name}-{split}-{seed}-{len(rows):05d}")
        expression = expression_of(row["problem"])
        if expression in seen or split_of(expression) != split:
            continue
        seen.add(expression)
        rows.append(row)
    return rows
