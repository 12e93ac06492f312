"""The evaluate stage: run the configured benchmarks on each finished checkpoint (base if no training stage ran,
then SFT, then RL), log to TensorBoard, and write a comparison table to ``<run>/eval/summary.md``.

Each checkpoint's evaluation resumes on its own after a kill (the evaluation package skips problems already written).
Problems are split across the rollout engines (:mod:`pipeline.rollout.groups`) in fixed batches with the seeds one
engine would use; the main rank then assembles the results from the files every engine wrote (the run folder must be
on a file system every rank sees).

A SIGTERM (SIGINT, SIGUSR1) stops the stage between evaluation batches, every one written so far kept
(:mod:`pipeline.preempt`); the rerun evaluates the rest.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from evaluation.report import scalars
from evaluation.run import evaluate
from lampo.io import atomic_write_text
from pipeline import dist, preempt
from pipeline.context import Context
from pipeline.rollout import RolloutEngine, engine_class
from pipeline.rollout.groups import RolloutGroups

CHECKPOINT_STEP = {"base": 0, "sft": 1, "rl": 2}  # x-axis of the eval scalars in TensorBoard


def checkpoints(ctx: Context) -> dict[str, Path]:
    found = {name: ctx.rd.path(st.output) for name in ("sft", "rl")
             if (st := ctx.rd.state(name)).status == "done" and st.output}
    return found or {"base": ctx.base_model}


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


def summary_table(all_results: dict[str, dict]) -> str:
    names = list(all_results)
    metrics = []  # (benchmark, metric) pairs in first-seen order
    for res in all_results.values():
        for bench, r in res["benchmarks"].items():
            metrics += [(bench, k) for k in r["metrics"] if not k.endswith("_se") and (bench, k) not in metrics]
    lines = ["| benchmark | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for bench, k in metrics:
        cells = []
        for n in names:
            r = all_results[n]["benchmarks"].get(bench, {}).get("metrics", {})
            cells.append(f"{100 * r[k]:.1f}%" if k in r else "-")
        lines.append(f"| {bench} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(ctx: Context) -> None:
    st = ctx.rd.state("evaluate")
    st.status = "running"
    results = {}
    groups = RolloutGroups.from_config(ctx.cfg)
    for name, path in checkpoints(ctx).items():
        engine = engine_class(ctx.cfg.rollout.engine)(path, ctx.tokenizer, ctx.cfg) if groups.is_leader else None
        try:
            res = evaluate_sharded(ctx, groups, engine, ctx.rd.path("eval", name), str(path), stoppable=True)
        except preempt.StopRequested:
            where = f"while evaluating {name}"
            ctx.record_preemption(st, where)
            raise preempt.Preempted("evaluate", where, None, note="every evaluation batch written so far is kept; "
                                    "run the same command again to evaluate the rest") from None
        finally:
            if engine is not None:
                engine.shutdown()
        if res is not None:
            results[name] = res
            ctx.log.scalars("eval", {k.removeprefix("eval/"): v for k, v in scalars(res).items()},
                            CHECKPOINT_STEP[name])
    if dist.is_main():
        table = summary_table(results)
        atomic_write_text(ctx.rd.path("eval", "summary.md"), table)
        ctx.log.print("\nHeld-out evaluation (" + ", ".join(ctx.cfg.eval.benchmarks) + "):\n" + table)
        st.status, st.output = "done", "eval/summary.md"
        ctx.rd.save_state(st)
    dist.barrier()
