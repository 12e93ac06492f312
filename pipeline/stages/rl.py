"""The RL stage: generate -> score -> advantage -> update -> sync weights -> log -> checkpoint, once per iteration.

Where this departs from the paper (arXiv 2605.21235), or fills a gap it leaves:

* the sequence score s_i of the pairwise weights is computed from the *trainer's* recomputed old log-probs (length-
  normalised by default; ``rl.algorithm.length_normalized_score``), not the rollout engine's, unless
  ``rl.algorithm.recompute_old_logprobs=false``;
* one RL iteration samples ``rl.prompts_per_iteration`` prompts x ``rollout.n_samples`` responses, then runs
  ``ppo_epochs`` passes of mini-batches of ``rl.mini_batch_size`` sequences (each an optimizer step); when that is a
  single step, the old log-probs (and so the sequence scores) are that step's own forward's, detached, instead of a
  separate forward's: the same numbers, one forward fewer (:func:`single_step`, ``backend.old_logprobs_from_step``);
* the rollout engine gets the trainer's weights at the start of each iteration (``rl.eval_every`` evaluates
  them there too, so iteration N's evaluation describes the policy after N updates);
* with ``rl.algorithm.dynamic_sampling`` the groups whose rewards are all equal are dropped (DAPO); no re-sampling
  is done to refill the batch;
* an optimizer step with a non-finite loss or gradient is skipped, logged and counted (``rl/skipped_updates``: the
  iteration's skipped steps); ``run.max_nonfinite_in_a_row`` in a row stop the stage, naming the iteration and the
  checkpoint to resume from.

A SIGTERM (SIGINT, SIGUSR1) stops the stage after the update of the iteration under way, which is then checkpointed
(:mod:`pipeline.preempt`): a rollout is never cut short.

Every rollout engine generates and scores a share of each iteration's prompts (:mod:`pipeline.rollout.groups`:
``rollout.tensor_parallel`` ranks per engine, every sample of a prompt on one engine); the scored shards are gathered
so every rank trains on the same batch, the one a single engine would have produced. The prompt order and the
sampling seed are functions of ``(run.seed, iteration)``, so a resumed run repeats exactly with an engine that honours
seeds (HF; SGLang only with ``rollout.sglang_deterministic``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from tqdm import tqdm

from evaluation.report import scalars
from lampo.advantages import ADVANTAGE_ESTIMATORS, drop_uniform_groups, pairwise_weight_stats, sequence_scores
from lampo.record import RolloutBatch, TokenBatch
from lampo.rewards import build_reward
from lampo.seeds import derive_seed
from pipeline import dist, preempt
from pipeline.backends import TrainingBackend, backend_class
from pipeline.backends.base import NonFiniteSteps
from pipeline.context import Context
from pipeline.data import batch_indices, load_rows
from pipeline.faults import fault_point
from pipeline.rollout import RolloutEngine, engine_class
from pipeline.rollout.collect import collect, gather_shards
from pipeline.rollout.groups import RolloutGroups, all_gather
from pipeline.sharded_eval import evaluate_sharded


def make_engine(cfg, model_path, tokenizer, backend: TrainingBackend) -> RolloutEngine:
    """This rank's rollout engine. When the trainer holds the whole model in this process (the torch backend) and the
    engine can sample from it as it is (the HF engine on the same device), it shares those weights: no second copy,
    and the weight sync copies nothing."""
    cls, module = engine_class(cfg.rollout.engine), backend.local_module()
    if module is not None and cls.can_share(module):
        return cls(model_path, tokenizer, cfg, model=module)
    return cls(model_path, tokenizer, cfg)


@dataclasses.dataclass
class OnPolicyStep:
    """What :func:`advantages` hands :func:`update` when the iteration's single optimizer step takes its old
    log-probs from its own forward (:meth:`~pipeline.backends.base.TrainingBackend.rl_step_on_policy`): the token
    batch without old log-probs or advantages yet, the rollout batch to write the advantages into, and the metrics
    known before the step. ``old_logprobs`` and ``advantages`` of ``tb`` are filled in by the step."""
    tb: TokenBatch
    batch: RolloutBatch
    metrics: dict[str, float]

    def __len__(self) -> int:
        return len(self.tb)


def single_step(ctx: Context, backend: TrainingBackend, n: int) -> bool:
    """Whether the iteration's update of ``n`` sequences is one optimizer step on the policy that sampled them, with
    old log-probs taken from that step's own forward: one PPO epoch, one mini-batch, old log-probs recomputed by the
    trainer (the engine's are another policy's numbers), no dynamic sampling (which drops groups by reward after the
    scores are taken), and the backend agrees (``backend.old_logprobs_from_step``)."""
    rl, algo = ctx.cfg.rl, ctx.cfg.rl.algorithm
    return (algo.ppo_epochs == 1 and 0 < n <= rl.mini_batch_size and algo.recompute_old_logprobs
            and not algo.dynamic_sampling and backend.fuses_old_logprobs(n))


def advantages(ctx: Context, backend: TrainingBackend, batch: RolloutBatch):
    """Old (and reference) log-probs, sequence scores and advantages; returns the token batch and metrics.

    When the iteration takes a single optimizer step (:func:`single_step`), the old log-probs are the update's own
    forward's: this returns an :class:`OnPolicyStep` (reference log-probs already in it) and :func:`update` computes
    the scores and advantages between that forward and the backward, with the same code as here
    (:func:`score_and_advantages`)."""
    algo = ctx.cfg.rl.algorithm
    tb = batch.to_token_batch(ctx.pad_id)
    if algo.kl_coef > 0:
        tb.ref_logprobs = backend.token_logprobs(tb, reference=True)
    # DAPO's filter, measured whatever the setting; applied below to the token batch only with dynamic sampling. Each
    # sample records whether it was trained on, so the rollout file and the token batch stay aligned.
    keep, drop = drop_uniform_groups(batch.rewards, batch.group_index)
    m = {"uniform_group_frac": 1.0 - keep.float().mean().item(),
         **{f"dynamic_{k}": v for k, v in drop.items() if k != "groups"}}
    for s, k in zip(batch.samples, keep.tolist()):
        s.metadata["trained"] = bool(k) or not algo.dynamic_sampling
    if single_step(ctx, backend, len(tb)):
        tb.old_logprobs = tb.advantages = None
        return OnPolicyStep(tb, batch, m), m
    if algo.recompute_old_logprobs or tb.old_logprobs is None:
        tb.old_logprobs = backend.token_logprobs(tb)
    tb.advantages = score_and_advantages(ctx, batch, tb.old_logprobs, tb.response_mask, m)
    if algo.dynamic_sampling:
        tb = tb.select(keep.nonzero().squeeze(-1))
    return tb, m


def score_and_advantages(ctx: Context, batch: RolloutBatch, old_logprobs: torch.Tensor, response_mask: torch.Tensor,
                         m: dict[str, float]) -> torch.Tensor:
    """Sequence scores from ``old_logprobs`` (B, T), then the advantages (B,), written into ``batch`` and returned;
    their metrics are added to ``m``.

    Old log-probs that are NaN or infinite on a response token (a broken engine or forward) cannot be scored: those
    rows get a score from their log-probs with the bad values read as 0, so that the advantages can be computed, and
    ``m["nonfinite_old_logprobs"]`` counts the rows; the old log-probs themselves stay as they are, so the optimizer
    step sees them and is skipped and counted like any other non-finite step (:mod:`pipeline.backends.base`)."""
    algo = ctx.cfg.rl.algorithm
    finite = torch.isfinite(old_logprobs) | ~response_mask.bool()  # (B, T)
    bad_rows = int((~finite.all(dim=1)).sum())
    if bad_rows:
        old_logprobs = torch.where(finite, old_logprobs, 0.0)
    m["nonfinite_old_logprobs"] = float(bad_rows)
    s = sequence_scores(old_logprobs, response_mask, length_normalized=algo.length_normalized_score)
    rewards, groups = batch.rewards, batch.group_index
    adv = ADVANTAGE_ESTIMATORS[algo.advantage](rewards, groups, seq_logprob=s, temperature=algo.lampo_temperature,
                                               pair_weight=algo.lampo_weight, scale_normalize=algo.scale_normalize)
    batch.set_advantages(adv)
    m.update({"adv_mean": adv.mean().item(), "adv_std": adv.std(correction=0).item(),
              "adv_abs_max": adv.abs().max().item(),
              **{f"pairwise_{k}": v for k, v in pairwise_weight_stats(rewards, groups, s, algo.lampo_temperature,
                                                                      pair_weight=algo.lampo_weight).items()}})
    return adv


def update(ctx: Context, backend: TrainingBackend, tb, it: int) -> dict[str, float]:
    """``ppo_epochs`` passes of optimizer steps over shuffled mini-batches of ``tb``; for an :class:`OnPolicyStep`,
    its one step (old log-probs, scores and advantages from the step's own forward; their metrics are returned
    too). Returns the steps' metrics merged."""
    rl, parts = ctx.cfg.rl, []
    if isinstance(tb, OnPolicyStep):
        fault_point("rl_update")
        pending = tb

        def advantages_fn(old: torch.Tensor) -> torch.Tensor:
            pending.tb.old_logprobs = old
            pending.tb.advantages = score_and_advantages(ctx, pending.batch, old, pending.tb.response_mask,
                                                         pending.metrics)
            return pending.tb.advantages

        where = f"iteration {it + 1}, update 1 of 1"
        try:
            step = backend.rl_step_on_policy(dataclasses.replace(tb.tb), advantages_fn)
        except NonFiniteSteps as e:
            raise ctx.nonfinite_stop("rl", e, where) from None
        if step.get("skipped_updates"):
            ctx.note_skipped_step(backend, "rl", step, where)
        return {**pending.metrics, **step}
    gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.run.seed, "rl_minibatches", it))
    per_epoch = -(-len(tb) // rl.mini_batch_size)
    for epoch in range(rl.algorithm.ppo_epochs):
        order = torch.randperm(len(tb), generator=gen)
        for start in range(0, len(tb), rl.mini_batch_size):
            fault_point("rl_update")
            k = epoch * per_epoch + start // rl.mini_batch_size + 1
            where = f"iteration {it + 1}, update {k} of {rl.algorithm.ppo_epochs * per_epoch}"
            try:
                parts.append(backend.rl_step(tb.select(order[start:start + rl.mini_batch_size])))
            except NonFiniteSteps as e:
                raise ctx.nonfinite_stop("rl", e, where) from None
            if parts[-1].get("skipped_updates"):
                ctx.note_skipped_step(backend, "rl", parts[-1], where)
    # each optimizer step's metrics: means over the steps, but a maximum (``ratio_max``) stays the maximum and the
    # skipped steps are counted
    def merged(k: str) -> float:
        values = [p[k] for p in parts]
        if k.endswith("_max"):
            return max(values)
        return sum(values) if k == "skipped_updates" else sum(values) / len(values)

    return {k: merged(k) for k in parts[0]} if parts else {}


def run(ctx: Context) -> None:
    cfg, rd, rl = ctx.cfg, ctx.rd, ctx.cfg.rl
    st = rd.state("rl")
    start = ctx.stage_input("rl")
    steps_per_iter = cfg.rl.algorithm.ppo_epochs * -(-rl.prompts_per_iteration * cfg.rollout.n_samples
                                                      // rl.mini_batch_size)
    backend = backend_class(cfg.backend.name).from_config(
        cfg, start, lr=rl.lr, total_steps=rl.iterations * steps_per_iter, warmup_steps=rl.warmup_steps,
        min_lr_ratio=rl.min_lr_ratio, weight_decay=rl.weight_decay, reference=rl.algorithm.kl_coef > 0)
    groups = RolloutGroups.from_config(cfg)
    ctx.log.print(f"[rl] {groups.n_engines} rollout engine(s) of {groups.size} rank(s) each")
    engine = make_engine(cfg, start, ctx.tokenizer, backend) if groups.is_leader else None
    ctx.begin_stage(backend, st)
    reward_fn = build_reward(rl.reward.outcome, rl.reward.dense, rl.reward.alpha, timeout_s=rl.reward.timeout_s,
                             model_path=rl.reward.embedding_model) if groups.is_leader else None
    rows = load_rows(cfg, "train")
    for it in tqdm(range(st.step, rl.iterations), desc="rl", initial=st.step, total=rl.iterations,
                   disable=not (cfg.run.progress and dist.is_main())):
        with rollout_phase(cfg, backend, engine):
            sync_weights(backend, engine, groups)  # the engines sample from the policy as trained so far
            if rl.eval_every and it > 0 and it % rl.eval_every == 0:
                evaluate_during_training(ctx, groups, engine, it)
            prompts = [rows[i] for i in batch_indices(len(rows), rl.prompts_per_iteration, it, cfg.run.seed)]
            local = collect(ctx, engine, reward_fn, groups, prompts, it) if engine is not None else None
        batch, m = gather_shards(all_gather(local, groups))
        t = time.perf_counter()
        # the token batch (called ``tb`` inside advantages() and update(), not renamed there while they are edited
        # elsewhere; ``tb`` is otherwise TensorBoard's)
        tokens, adv_m = advantages(ctx, backend, batch)
        m.update(adv_m, **update(ctx, backend, tokens, it))
        m["time_training"] = time.perf_counter() - t
        m.update(batch_stats(batch, m, rl.reward.outcome))
        if dist.is_main():
            log_iteration(ctx, batch, m, it + 1)
        if (it + 1) % rl.checkpoint_every == 0 or it + 1 == rl.iterations:
            ctx.save_checkpoint(backend, st, it + 1)
        try:
            ctx.preemption_point(backend, st, it + 1)  # a SIGTERM stops here, with a checkpoint
        except preempt.Preempted:
            if engine is not None:
                engine.shutdown()
            raise
    ctx.finish_stage(st, ctx.export(backend, "rl/final"), step=rl.iterations)
    if engine is not None:
        engine.shutdown()
    ctx.log.print(f"[rl] done: {st.output}")


@contextlib.contextmanager
def rollout_phase(cfg, backend: TrainingBackend, engine: RolloutEngine | None):
    """With ``rollout.colocate``, the trainer frees accelerator memory while the engine holds it, and back."""
    if not cfg.rollout.colocate:
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


def evaluate_during_training(ctx: Context, groups: RolloutGroups, engine: RolloutEngine | None, step: int) -> None:
    """Evaluate the current policy (the rollout engines hold its weights) on ``eval.benchmarks``, split across the
    engines; every rank takes part."""
    res = evaluate_sharded(ctx, groups, engine, ctx.rd.path("eval", f"rl_iter_{step:05d}"), f"rl iteration {step}")
    if res is not None:
        ctx.log.scalars("rl_eval", {k.removeprefix("eval/"): v for k, v in scalars(res).items()}, step)


def sync_weights(backend: TrainingBackend, engine: RolloutEngine | None, groups: RolloutGroups) -> None:
    """Stream the trainer's full weights into this rank's rollout engine, if it leads one (every rank iterates:
    gathers are collective)."""
    tensors = backend.named_full_tensors(ranks=groups.leaders())
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
