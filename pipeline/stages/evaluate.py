"""The evaluate stage: run the configured benchmarks on each finished checkpoint (base if no training stage ran,
then SFT, then RL), log to TensorBoard, and write a comparison table to ``<run>/eval/summary.md``.

Each checkpoint's evaluation resumes on its own after a kill (the evaluation package skips problems already written).
"""
from __future__ import annotations

from pathlib import Path

from evaluation.report import scalars
from evaluation.run import evaluate
from pipeline import dist
from pipeline.context import Context
from pipeline.rollout import RolloutEngine, engine_class
from pipeline.state import atomic_write_text

CHECKPOINT_STEP = {"base": 0, "sft": 1, "rl": 2}  # x-axis of the eval scalars in TensorBoard


def checkpoints(ctx: Context) -> dict[str, Path]:
    found = {name: ctx.rd.path(st.output) for name in ("sft", "rl")
             if (st := ctx.rd.state(name)).status == "done" and st.output}
    return found or {"base": ctx.base_model}


def evaluate_engine(ctx: Context, engine: RolloutEngine, out_dir: Path, model_id: str) -> dict:
    e = ctx.cfg.eval
    return evaluate(engine, ctx.tokenizer, e.benchmarks, samples=e.samples, temperature=e.temperature, top_p=e.top_p,
                    max_new_tokens=e.max_new_tokens, out_dir=out_dir, data_dir=e.data_dir, limit=e.limit,
                    seed=ctx.cfg.run.seed, batch_size=max(1, ctx.cfg.rollout.batch_size // e.samples),
                    timeout_s=ctx.cfg.rl.reward.timeout_s, progress=ctx.cfg.run.progress, model_id=model_id)


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
    for name, path in checkpoints(ctx).items():
        if dist.is_main():  # evaluation generates on one process; the other ranks wait
            engine = engine_class(ctx.cfg.rollout.engine)(path, ctx.tokenizer, ctx.cfg)
            results[name] = evaluate_engine(ctx, engine, ctx.rd.path("eval", name), str(path))
            engine.shutdown()
            ctx.log.scalars("eval", {k.removeprefix("eval/"): v for k, v in scalars(results[name]).items()},
                            CHECKPOINT_STEP[name])
        dist.barrier()
    if dist.is_main():
        table = summary_table(results)
        atomic_write_text(ctx.rd.path("eval", "summary.md"), table)
        ctx.log.print("\nHeld-out evaluation (" + ", ".join(ctx.cfg.eval.benchmarks) + "):\n" + table)
        st.status, st.output = "done", "eval/summary.md"
        ctx.rd.save_state(st)
    dist.barrier()
