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

from pathlib import Path

from evaluation.report import scalars
from lampo.files import atomic_write_text
from pipeline import dist, preempt
from pipeline.context import Context
from pipeline.rollout import engine_class
from pipeline.rollout.groups import RolloutGroups
from pipeline.sharded_eval import evaluate_sharded
from pipeline.stages import STAGES, TRAINING_STAGES

# x-axis of the eval scalars in TensorBoard: base 0, sft 1, rl 2
CHECKPOINT_STEP = {"base": 0, **{name: i + 1 for i, name in enumerate(TRAINING_STAGES)}}


def checkpoints(ctx: Context) -> dict[str, Path]:
    """The finished training stages' outputs, in run order, or the base model when none has finished."""
    found = {name: ctx.rd.path(st.output) for name in TRAINING_STAGES
             if (st := ctx.rd.state(name)).status == "done" and st.output}
    return found or {"base": ctx.base_model}


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
    summary = ctx.rd.path(STAGES["evaluate"].folder, "summary.md")
    for name, path in checkpoints(ctx).items():
        engine = engine_class(ctx.cfg.rollout.engine)(path, ctx.tokenizer, ctx.cfg) if groups.is_leader else None
        try:
            res = evaluate_sharded(ctx, groups, engine, summary.parent / name, str(path), stoppable=True)
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
        atomic_write_text(summary, table)
        ctx.log.print("\nHeld-out evaluation (" + ", ".join(ctx.cfg.eval.benchmarks) + "):\n" + table)
    ctx.finish_stage(st, summary)
    dist.barrier()
