"""The RL stage: generate -> score -> advantage -> update -> sync weights -> log -> checkpoint, once per iteration.

Where this departs from the paper (arXiv 2605.21235), or fills a gap it leaves:

* the sequence score s_i of the pairwise weights is computed from the *trainer's* recomputed old log-probs (length-
  normalised by default; ``rl.algorithm.length_normalized_score``), not the rollout engine's, unless
  ``rl.algorithm.recompute_old_logprobs=false``;
* one RL iteration samples ``rl.prompts_per_iteration`` prompts x ``rollout.n_samples`` responses, then runs
  ``ppo_epochs`` passes of mini-batches of ``rl.mini_batch_size`` sequences (each an optimizer step);
* the rollout engine gets the trainer's weights at the start of each iteration (``rl.eval_every`` evaluates
  them there too, so iteration N's evaluation describes the policy after N updates);
* with ``rl.algorithm.dynamic_sampling`` the groups whose rewards are all equal are dropped (DAPO); no re-sampling
  is done to refill the batch.

Only the main rank generates and scores; the scored batch is broadcast so every rank trains on the same data.
The prompt order and the sampling seed are functions of ``(run.seed, iteration)``, so a resumed run repeats exactly.
"""
from __future__ import annotations

import contextlib
import time

import torch
from tqdm import tqdm

from lampo.advantages import ADVANTAGE_ESTIMATORS, pairwise_weight_stats, sequence_scores, uniform_groups
from lampo.record import RolloutBatch, Sample
from lampo.rewards import build_reward
from pipeline import dist
from pipeline.backends import TrainingBackend, backend_class
from pipeline.context import Context
from pipeline.data import format_prompt, load_rows
from pipeline.faults import fault_point
from pipeline.rollout import RolloutEngine, SamplingParams, engine_class
from pipeline.stages.sft import batch_indices


def generate(ctx: Context, engine: RolloutEngine, rows: list[dict], it: int) -> RolloutBatch:
    r = ctx.cfg.rollout
    prompts = [format_prompt(row, ctx.cfg, ctx.tokenizer) for row in rows]
    params = SamplingParams(n=r.n_samples, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_new_tokens=r.max_new_tokens, seed=ctx.cfg.run.seed * 100_003 + it)
    gens = engine.generate(prompts, params)
    fault_point("rl_rollout")
    samples = []
    for g in gens:
        row = rows[g.prompt_index]
        samples.append(Sample(prompt_ids=prompts[g.prompt_index], response_ids=g.token_ids, group=g.prompt_index,
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


def advantages(ctx: Context, backend: TrainingBackend, batch: RolloutBatch):
    """Old (and reference) log-probs, sequence scores and advantages; returns the token batch and metrics."""
    algo = ctx.cfg.rl.algorithm
    tb = batch.to_token_batch(ctx.pad_id)
    if algo.recompute_old_logprobs or tb.old_logprobs is None:
        tb.old_logprobs = backend.token_logprobs(tb)
    if algo.kl_coef > 0:
        tb.ref_logprobs = backend.token_logprobs(tb, reference=True)
    s = sequence_scores(tb.old_logprobs, tb.response_mask, length_normalized=algo.length_normalized_score)
    rewards, groups = batch.rewards, batch.group_index
    adv = ADVANTAGE_ESTIMATORS[algo.advantage](rewards, groups, seq_logprob=s, temperature=algo.lampo_temperature,
                                               scale_normalize=algo.scale_normalize)
    batch.set_advantages(adv)
    tb.advantages = adv
    m = {"adv_mean": adv.mean().item(), "adv_std": adv.std(correction=0).item(), "adv_abs_max": adv.abs().max().item(),
         **{f"pairwise_{k}": v for k, v in pairwise_weight_stats(rewards, groups, s, algo.lampo_temperature).items()}}
    keep = ~uniform_groups(rewards, groups)
    m["uniform_group_frac"] = 1.0 - keep.float().mean().item()
    if algo.dynamic_sampling:
        tb = tb.select(keep.nonzero().squeeze(-1))
    return tb, m


def update(ctx: Context, backend: TrainingBackend, tb, it: int) -> dict[str, float]:
    rl, parts = ctx.cfg.rl, []
    gen = torch.Generator().manual_seed(ctx.cfg.run.seed * 7919 + it)
    for _ in range(rl.algorithm.ppo_epochs):
        order = torch.randperm(len(tb), generator=gen)
        for start in range(0, len(tb), rl.mini_batch_size):
            fault_point("rl_update")
            parts.append(backend.rl_step(tb.select(order[start:start + rl.mini_batch_size])))
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]} if parts else {}


def run(ctx: Context) -> None:
    cfg, rd, rl = ctx.cfg, ctx.rd, ctx.cfg.rl
    st = rd.state("rl")
    start = ctx.stage_input("rl")
    steps_per_iter = cfg.rl.algorithm.ppo_epochs * -(-rl.prompts_per_iteration * cfg.rollout.n_samples
                                                      // rl.mini_batch_size)
    backend = backend_class(cfg.backend.name)(
        cfg, start, lr=rl.lr, total_steps=rl.iterations * steps_per_iter, warmup_steps=rl.warmup_steps,
        min_lr_ratio=1.0, weight_decay=rl.weight_decay, reference=rl.algorithm.kl_coef > 0)
    engine = engine_class(cfg.rollout.engine)(start, ctx.tokenizer, cfg) if dist.is_main() else None
    ctx.begin_stage(backend, st, "iteration")
    reward_fn = build_reward(rl.reward.outcome, rl.reward.dense, rl.reward.alpha, timeout_s=rl.reward.timeout_s,
                             model_path=rl.reward.embedding_model) if dist.is_main() else None
    rows = load_rows(cfg, "train")
    for it in tqdm(range(st.step, rl.iterations), desc="rl", initial=st.step, total=rl.iterations,
                   disable=not (cfg.run.progress and dist.is_main())):
        m: dict[str, float] = {}
        batch = None
        with rollout_phase(cfg, backend, engine):
            sync_weights(backend, engine)  # the engine samples from the policy as trained so far
            if dist.is_main() and rl.eval_every and it > 0 and it % rl.eval_every == 0:
                evaluate_during_training(ctx, engine, it)
            if dist.is_main():
                t = time.perf_counter()
                prompts = [rows[i] for i in batch_indices(len(rows), rl.prompts_per_iteration, it, cfg.run.seed)]
                batch = generate(ctx, engine, prompts, it)
                m["time_rollout"] = time.perf_counter() - t
        if dist.is_main():
            t = time.perf_counter()
            m.update(score(reward_fn, batch))
            m["time_scoring"] = time.perf_counter() - t
        batch = dist.broadcast(batch)
        t = time.perf_counter()
        tb, adv_m = advantages(ctx, backend, batch)
        m.update(adv_m, **update(ctx, backend, tb, it))
        m["time_training"] = time.perf_counter() - t
        m.update(batch_stats(batch, m, rl.reward.outcome))
        if dist.is_main():
            log_iteration(ctx, batch, m, it + 1)
        if (it + 1) % rl.checkpoint_every == 0 or it + 1 == rl.iterations:
            ctx.save_checkpoint(backend, st, it + 1)
    out = ctx.export(backend, "rl/final")
    st.status, st.step, st.output = "done", rl.iterations, str(out.relative_to(rd.root))
    if dist.is_main():
        rd.save_state(st)
        engine.shutdown()
    ctx.log.print(f"[rl] done: {st.output}")


@contextlib.contextmanager
def rollout_phase(cfg, backend: TrainingBackend, engine: RolloutEngine | None):
    """With ``backend.colocate_rollout``, the trainer frees accelerator memory while the engine holds it, and back."""
    if not cfg.backend.colocate_rollout:
        yield
        return
    backend.release_memory()
    if engine is not None:
        engine.reacquire_memory()
    try:
        yield
    finally:
        if engine is not None:
            engine.release_memory()
        backend.reacquire_memory()


def evaluate_during_training(ctx: Context, engine: RolloutEngine, step: int) -> None:
    """Evaluate the current policy (the rollout engine holds its weights) on ``eval.benchmarks``."""
    from evaluation.report import scalars
    from pipeline.stages.evaluate import evaluate_engine

    res = evaluate_engine(ctx, engine, ctx.rd.path("eval", f"rl_iter_{step:05d}"), f"rl iteration {step}")
    ctx.log.scalars("rl_eval", {k.removeprefix("eval/"): v for k, v in scalars(res).items()}, step)


def sync_weights(backend: TrainingBackend, engine: RolloutEngine | None) -> None:
    """Stream the trainer's full weights into the rollout engine (every rank iterates: gathers are collective)."""
    tensors = backend.named_full_tensors()
    if engine is not None:
        engine.update_weights(tensors)
    else:
        for _ in tensors:
            pass


def batch_stats(batch: RolloutBatch, m: dict[str, float], outcome: str) -> dict[str, float]:
    rewards = batch.rewards
    lengths = torch.tensor([len(s.response_ids) for s in batch.samples], dtype=torch.float32)
    out = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
           "accuracy": sum(s.reward_components[outcome] for s in batch.samples) / len(batch),
           "response_len_mean": lengths.mean().item(), "response_len_max": lengths.max().item(),
           "finished_frac": sum(s.finished for s in batch.samples) / len(batch)}
    if "time_rollout" in m:
        out["rollout_tokens_per_s"] = lengths.sum().item() / max(m["time_rollout"], 1e-9)
    return out


def log_iteration(ctx: Context, batch: RolloutBatch, m: dict[str, float], step: int) -> None:
    ctx.log.scalars("rl", m, step)
    for s in batch.samples[: ctx.cfg.rl.log_samples]:
        ctx.log.text("rl/samples", f"**prompt** {s.prompt}\n\n**response** {s.response}\n\n**reward** {s.reward:.3f}",
                     step)
    path = ctx.rd.path("rl", "rollouts", f"iter_{step:05d}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    batch.save(path)
