"""Collecting rollouts, shared by the RL stage and the standalone rollout stage: each rollout engine generates and
scores its share of the prompts (:mod:`pipeline.rollout.groups`), and the shards are gathered into the one batch a
single engine would have produced."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lampo.record import RolloutBatch, Sample
from lampo.seeds import derive_seed
from pipeline.data import format_prompt
from pipeline.faults import fault_point
from pipeline.rollout import RolloutEngine, SamplingParams
from pipeline.rollout.groups import RolloutGroups, shard_params

if TYPE_CHECKING:
    from pipeline.context import Context


def generate(ctx: Context, engine: RolloutEngine, rows: list[dict], it: int,
             shard: range | None = None) -> RolloutBatch:
    """Sample ``rollout.n_samples`` responses for ``rows[shard]`` (default: all rows); groups are numbered by the
    row's index in ``rows``, so the shards of one iteration fit together."""
    r = ctx.cfg.rollout
    shard = range(len(rows)) if shard is None else shard
    prompts = [format_prompt(rows[i], ctx.cfg, ctx.tokenizer) for i in shard]
    # the engine's log-probs are needed only when the trainer does not recompute the old ones
    params = SamplingParams(n=r.n_samples, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_new_tokens=r.max_new_tokens, seed=derive_seed(ctx.cfg.run.seed, "rollout", it),
                            logprobs=not ctx.cfg.rl.algorithm.recompute_old_logprobs)
    gens = engine.generate(prompts, shard_params(params, shard))
    fault_point("rl_rollout")
    samples = []
    for g in gens:
        row, group = rows[shard.start + g.prompt_index], shard.start + g.prompt_index
        samples.append(Sample(prompt_ids=prompts[g.prompt_index], response_ids=g.token_ids, group=group,
                              prompt=row["problem"], answer=row["answer"], reference=row["solution"],
                              response=ctx.tokenizer.decode(g.token_ids, skip_special_tokens=True),
                              response_logprobs=g.logprobs, finished=g.finished, metadata={"id": row["id"]}))
    return RolloutBatch(samples)


def score(reward_fn, batch: RolloutBatch) -> dict[str, float]:
    res = reward_fn([s.response for s in batch.samples], answers=[s.answer for s in batch.samples],
                    references=[s.reference for s in batch.samples])
    for i, s in enumerate(batch.samples):
        s.reward = res.total[i]
        s.reward_components = {k: v[i] for k, v in res.components.items()}
    out = {f"reward_{k}": sum(v) / len(v) for k, v in res.components.items()}
    # responses a reward could not score (no final answer, a timeout, ...): they got 0 for that component
    out["reward_unscored_frac"] = sum(r is not None for r in res.reasons) / len(res.reasons)
    return out


def collect(ctx: Context, engine: RolloutEngine, reward_fn, groups: RolloutGroups, prompts: list[dict],
            it: int) -> tuple[RolloutBatch, dict[str, float]]:
    """This engine's share of the iteration: generate and score ``prompts[shard]``; returns the shard and its
    metrics (``time_*`` in seconds, the rest means over the shard)."""
    shard = groups.my_shard(len(prompts), engine.shard_granule(ctx.cfg.rollout.n_samples))
    t = time.perf_counter()
    batch = generate(ctx, engine, prompts, it, shard)
    m = {"time_rollout": time.perf_counter() - t}
    t = time.perf_counter()
    if len(batch):
        m.update(score(reward_fn, batch))
    m["time_scoring"] = time.perf_counter() - t
    return batch, m


def gather_shards(shards: list[tuple[RolloutBatch, dict[str, float]]]) -> tuple[RolloutBatch, dict[str, float]]:
    """The engines' scored shards (in engine order, so in prompt order) -> one batch and its metrics: times are the
    slowest engine's, means are weighted by each shard's size."""
    batch = RolloutBatch([s for b, _ in shards for s in b.samples])
    m: dict[str, float] = {}
    for key in {k for _, sm in shards for k in sm}:
        if key.startswith("time_"):
            m[key] = max(sm[key] for _, sm in shards if key in sm)
        else:
            m[key] = sum(sm[key] * len(b) for b, sm in shards if key in sm) / len(batch)
    return batch, m
