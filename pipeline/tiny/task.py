"""The tiny synthetic task, re-exported: it is defined in :mod:`evaluation.tiny_task` (the evaluation package's ``tiny``
benchmarks are its held-out split, and evaluation must not import the pipeline)."""
from __future__ import annotations

from evaluation.tiny_task import (
    HELDOUT_BUCKETS,
    MAX_OPERAND,
    MAX_OPS,
    NUM_OPS,
    POOL_SIZE,
    SPLITS,
    TINY_HELDOUT_DEFAULT,
    expression_of,
    make_row,
    make_split,
    pool_size,
    solve,
    split_of,
)

__all__ = ["HELDOUT_BUCKETS", "MAX_OPERAND", "MAX_OPS", "NUM_OPS", "POOL_SIZE", "SPLITS", "TINY_HELDOUT_DEFAULT",
           "expression_of", "make_row", "make_split", "pool_size", "solve", "split_of"]
