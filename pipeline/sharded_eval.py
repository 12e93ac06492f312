"""Evaluating one model across the rollout engines, shared by the evaluate stage and the RL stage's evaluations
during training (``rl.eval_every``).

Problems are split across the rollout engines (:mod:`pipeline.rollout.groups`) in fixed batches with the seeds one
engine would use; the main rank then assembles the results from the files every engine wrote (the run folder must be
on a file system every rank sees).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.run import evaluate
from pipeline import dist, preempt
from pipeline.rollout import RolloutEngine
from pipeline.rollout.groups import RolloutGroups

if TYPE_CHECKING:
    from pipeline.context import Context


def evaluate_engine(ctx: Context, engine: RolloutEngine, out_dir: Path, model_id: str,
                    shard: tuple[int, int] | None = None, after_batch: Callable[[], None] | None = None) -> dict | None:
    e = ctx.cfg.eval
    return evaluate(engine, ctx.tokenizer, e.benchmarks, samples=e.samples, temperature=e.temperature, top_p=e.top_p,
                    max_new_tokens=e.max_new_tokens, out_dir=out_dir, data_dir=e.data_dir, limit=e.limit,
                    seed=ctx.cfg.run.seed, batch_size=max(1, ctx.cfg.rollout.batch_size // e.samples),
                    timeout_s=ctx.cfg.rl.reward.timeout_s, progress=ctx.cfg.run.progress, model_id=model_id,
                    shard=shard, after_batch=after_batch)


def evaluate_sharded(ctx: Context, groups: RolloutGroups, engine: RolloutEngine | None, out_dir: Path,
                     model_id: str, stoppable: bool = False) -> dict | None:
    """Every engine evaluates its share; the main rank (which leads engine 0) assembles and returns the results,
    the other ranks return None. Every rank must call this.

    ``stoppable``: a stop request ends each engine's generation at its next batch boundary (each batch is written);
    once every rank is through, the ranks agree and raise :class:`~pipeline.preempt.StopRequested` together."""
    single = groups.n_engines == 1
    res = None
    if engine is not None:
        with contextlib.suppress(preempt.StopRequested):  # this engine stopped between batches: agreed on below
            res = evaluate_engine(ctx, engine, out_dir, model_id,
                                  shard=None if single else (groups.engine_index, groups.n_engines),
                                  after_batch=preempt.between_batches if stoppable else None)
    dist.barrier()
    if stoppable and preempt.agreed():
        raise preempt.StopRequested
    if single:
        return res
    res = evaluate_engine(ctx, engine, out_dir, model_id) if dist.is_main() else None  # generates nothing
    dist.barrier()
    return res
