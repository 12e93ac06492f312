"""The standalone rollout stage: sample and score ``rollout.n_samples`` responses for held-out prompts from the
newest checkpoint, and write them as a rollout record (``<run>/rollout/samples.jsonl``) that can be replayed. The
prompts are split across the rollout engines as in the RL stage."""
from __future__ import annotations

from lampo.rewards import build_reward
from pipeline import dist
from pipeline.context import Context
from pipeline.data import load_rows
from pipeline.rollout import engine_class
from pipeline.rollout.collect import collect, gather_shards
from pipeline.rollout.groups import RolloutGroups, all_gather
from pipeline.stages import STAGES


def run(ctx: Context) -> None:
    st, cfg = ctx.rd.state("rollout"), ctx.cfg
    path = ctx.stage_input("evaluate")
    groups = RolloutGroups.from_config(cfg)
    rows = load_rows(cfg, "heldout")[: cfg.rl.prompts_per_iteration]
    local = None
    if groups.is_leader:
        engine = engine_class(cfg.rollout.engine)(path, ctx.tokenizer, cfg)
        r = cfg.rl.reward
        reward_fn = build_reward(r.outcome, r.dense, r.alpha, timeout_s=r.timeout_s, model_path=r.embedding_model)
        local = collect(ctx, engine, reward_fn, groups, rows, it=0)
        engine.shutdown()
    batch, m = gather_shards(all_gather(local, groups))
    out = ctx.rd.path(STAGES["rollout"].folder, "samples.jsonl")
    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        batch.save(out)
        ctx.log.scalars("rollout", {**m, "reward_mean": batch.rewards.mean().item()}, 0)
        ctx.log.print(f"[rollout] {len(batch)} samples from {path} -> {out} (mean reward {batch.rewards.mean():.3f})")
    ctx.finish_stage(st, out)
    dist.barrier()
