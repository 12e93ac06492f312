"""The standalone rollout stage: sample and score ``rollout.n_samples`` responses for held-out prompts from the
newest checkpoint, and write them as a rollout record (``<run>/rollout/samples.jsonl``) that can be replayed."""
from __future__ import annotations

from lampo.rewards import build_reward
from pipeline import dist
from pipeline.context import Context
from pipeline.data import load_rows
from pipeline.rollout import engine_class
from pipeline.stages.rl import generate, score


def run(ctx: Context) -> None:
    st = ctx.rd.state("rollout")
    if dist.is_main():
        cfg = ctx.cfg
        path = ctx.stage_input("evaluate")
        engine = engine_class(cfg.rollout.engine)(path, ctx.tokenizer, cfg)
        rows = load_rows(cfg, "heldout")[: cfg.rl.prompts_per_iteration]
        batch = generate(ctx, engine, rows, it=0)
        engine.shutdown()
        r = cfg.rl.reward
        m = score(build_reward(r.outcome, r.dense, r.alpha, timeout_s=r.timeout_s, model_path=r.embedding_model), batch)
        out = ctx.rd.path("rollout", "samples.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        batch.save(out)
        ctx.log.scalars("rollout", {**m, "reward_mean": batch.rewards.mean().item()}, 0)
        ctx.log.print(f"[rollout] {len(batch)} samples from {path} -> {out} (mean reward {batch.rewards.mean():.3f})")
        st.status, st.output = "done", str(out.relative_to(ctx.rd.root))
        ctx.rd.save_state(st)
    dist.barrier()
