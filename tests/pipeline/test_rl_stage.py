"""The RL stage's steps, one at a time and chained, with a scripted rollout engine and a recording backend
(``rl_fakes.py``): collect (generate + score) on each rollout engine, gather the shards, advantages (old and reference
log-probs, sequence scores, estimator, dynamic sampling), update (PPO epochs of mini-batches).

Each test compares what a step hands on with values worked out here from the fakes' known token ids, log-probs and
rewards, so that a stage which reads a config field wrongly (the LamPO temperature, the score's length normalisation,
the dynamic-sampling filter, the number of PPO epochs, the KL reference) or scores against the wrong field of a row
fails here, not only as a worse curve in a long run."""
from __future__ import annotations

import math

import pytest
import torch

from lampo.advantages import drop_uniform_groups
from lampo.record import TokenBatch
from pipeline.rollout import collect
from pipeline.rollout.groups import RolloutGroups
from pipeline.stages import rl
from tests.pipeline.rl_fakes import (
    EOS,
    PAD,
    CharTokenizer,
    RecordingBackend,
    RecordingReward,
    ScriptedEngine,
    encode,
    engine_logprob,
    make_ctx,
    policy_logprobs,
    reference_logprobs,
    row_key,
)

ROWS = [
    {"id": "a", "problem": "2+1", "answer": "3", "solution": "2+1=3, so \\boxed{3}"},
    {"id": "b", "problem": "4+1", "answer": "5", "solution": "4+1=5, so \\boxed{5}"},
    {"id": "c", "problem": "6+2", "answer": "8", "solution": "6+2=8, so \\boxed{8}"},
    {"id": "d", "problem": "7+2", "answer": "9", "solution": "7+2=9, so \\boxed{9}"},
]
# four responses per prompt, of different lengths; a response is right when it is the answer up to spaces
SCRIPT = {
    "2+1": ["3", "4", "3 ", "so it is 12"],        # rewards 1 0 1 0
    "4+1": ["5", "the answer: 55", "7", " 5"],     # 1 0 0 1
    "6+2": ["1", "2", "33", "0"],                  # all wrong: a uniform group
    "7+2": ["9", " 9", "9  ", "  9"],              # all right: a uniform group
}
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
INFORMATIVE = list(range(8))  # the rows of groups 0 and 1
N = 4  # rollout.n_samples
BASE = ("rollout.n_samples=4", "rl.mini_batch_size=16", "run.seed=3")


def chain(*overrides: str, it: int = 0, on_policy: bool = False):
    """collect (one engine) -> gather -> advantages -> update, as ``rl.run`` chains them; returns everything.
    ``on_policy``: the backend takes a single step's old log-probs from its own forward (``fuses_old_logprobs``)."""
    ctx = make_ctx(*BASE, *overrides)
    engine, reward = ScriptedEngine(SCRIPT, ctx.tokenizer), RecordingReward()
    backend = RecordingBackend(on_policy=on_policy)
    local = rl.collect(ctx, engine, reward, RolloutGroups(1, 0, 1), ROWS, it)
    batch, m = rl.gather_shards([local])
    tb, adv_m = rl.advantages(ctx, backend, batch)
    upd = rl.update(ctx, backend, tb, it)
    return {"ctx": ctx, "engine": engine, "reward": reward, "backend": backend, "batch": batch, "tb": tb,
            "metrics": {**m, **adv_m}, "update": upd}


def expected_rows() -> list[tuple[list[int], list[int], int]]:
    """(prompt ids, response ids, group) of every sample, in prompt-major order, from the script alone."""
    return [(encode(r["problem"]), encode(text) + [EOS], g)
            for g, r in enumerate(ROWS) for text in SCRIPT[r["problem"]]]


def scores(length_normalized: bool) -> list[float]:
    """s_i by hand: the recording backend's log-probs of the response tokens, their mean or their sum."""
    out = []
    for p, resp, _ in expected_rows():
        lp = policy_logprobs(TokenBatch.from_sequences([p], [resp], PAD))[0, len(p):].tolist()
        out.append(sum(lp) / len(lp) if length_normalized else sum(lp))
    return out


def lampo_by_hand(r: list[float], groups: list[int], s: list[float], tau: float) -> list[float]:
    """The README's formula as a double loop:
    A_i = 2/(G-1) sum_{j != i} (r_i - r_j) sigmoid(-sign(r_i - r_j) (s_i - s_j) / tau)."""
    out = []
    for i in range(len(r)):
        mates = [j for j in range(len(r)) if groups[j] == groups[i] and j != i]
        total = 0.0
        for j in mates:
            d = r[i] - r[j]
            sign = (d > 0) - (d < 0)
            total += d / (1.0 + math.exp(sign * (s[i] - s[j]) / tau))
        out.append(2.0 / len(mates) * total if mates else 0.0)
    return out


def preference_by_hand(r: list[float], groups: list[int], s: list[float], tau: float) -> list[float]:
    """``rl.algorithm.lampo_weight=preference`` as a double loop:
    A_i = sum_{j != i} w_ij (r_i - r_j) / sum_{j != i} w_ij,  w_ij = sigmoid((s_i - s_j) / tau)."""
    out = []
    for i in range(len(r)):
        mates = [j for j in range(len(r)) if groups[j] == groups[i] and j != i]
        w = [1.0 / (1.0 + math.exp(-(s[i] - s[j]) / tau)) for j in mates]
        out.append(sum(wj * (r[i] - r[j]) for wj, j in zip(w, mates)) / sum(w) if mates else 0.0)
    return out


def preference_weight_mean(r: list[float], groups: list[int], s: list[float], tau: float) -> float:
    """The preference form's ``weight_mean`` by hand: sigmoid((s_better - s_worse) / tau) over unequal pairs."""
    w = [1.0 / (1.0 + math.exp(-(s[i] - s[j]) * (1 if r[i] > r[j] else -1) / tau))
         for i in range(len(r)) for j in range(i + 1, len(r)) if groups[i] == groups[j] and r[i] != r[j]]
    return sum(w) / len(w)


def trained_rows(backend: RecordingBackend) -> list[list[tuple[int, ...]]]:
    """The rows (by their ids) of every rl_step batch, in call order."""
    return [[row_key(b, i) for i in range(len(b))] for b in backend.steps]


def called_rows(backend: RecordingBackend, reference: bool) -> list[tuple[int, ...]]:
    """The rows (by their ids) of every token_logprobs call for the policy (or the reference), all calls together."""
    return [row_key(b, i) for b, ref in backend.logprob_calls if ref == reference for i in range(len(b))]


def sample_key(s) -> tuple[int, ...]:
    return tuple(s.prompt_ids + s.response_ids)


# --- collect: generate and score ------------------------------------------------------------------------------------
def test_generate_keeps_the_engines_tokens_and_logprobs_and_the_rows_fields():
    ctx = make_ctx(*BASE)
    engine = ScriptedEngine(SCRIPT, ctx.tokenizer)
    batch = collect.generate(ctx, engine, ROWS, it=5)
    assert [(s.prompt_ids, s.response_ids, s.group) for s in batch.samples] == expected_rows()
    for s in batch.samples:
        row = ROWS[s.group]
        assert (s.prompt, s.answer, s.reference, s.metadata) == (row["problem"], row["answer"], row["solution"],
                                                                 {"id": row["id"]})
        assert s.response == CharTokenizer().decode(s.response_ids, skip_special_tokens=True)
        assert s.response_logprobs == [engine_logprob(t, k) for k, t in enumerate(s.response_ids)]
    (prompts, params), = engine.calls
    assert prompts == [encode(r["problem"]) for r in ROWS]
    assert (params.n, params.seed) == (N, 3 * 100_003 + 5)
    assert (params.temperature, params.max_new_tokens) == (ctx.cfg.rollout.temperature, ctx.cfg.rollout.max_new_tokens)


def test_scoring_checks_each_response_against_its_rows_gold_answer():
    ctx = make_ctx(*BASE)
    reward = RecordingReward()
    batch, m = rl.collect(ctx, ScriptedEngine(SCRIPT, ctx.tokenizer), reward, RolloutGroups(1, 0, 1), ROWS, 0)
    (call,) = reward.calls
    assert call["answers"] == [ROWS[g]["answer"] for _, _, g in expected_rows()]
    assert call["references"] == [ROWS[g]["solution"] for _, _, g in expected_rows()]
    assert call["responses"] == [s.response for s in batch.samples]
    assert batch.rewards.tolist() == REWARDS
    assert [s.reward_components for s in batch.samples] == [{"exact": r} for r in REWARDS]
    assert m["reward_exact"] == pytest.approx(sum(REWARDS) / len(REWARDS))
    assert m["reward_unscored_frac"] == pytest.approx(REWARDS.count(0.0) / len(REWARDS))
    assert m["time_rollout"] >= 0 and m["time_scoring"] >= 0


def test_engines_split_the_prompts_and_the_gathered_shards_are_the_one_engine_batch():
    ctx = make_ctx(*BASE)
    single = rl.collect(ctx, ScriptedEngine(SCRIPT, ctx.tokenizer), RecordingReward(), RolloutGroups(1, 0, 1), ROWS, 2)
    engines = [ScriptedEngine(SCRIPT, ctx.tokenizer) for _ in range(2)]
    shards = [rl.collect(ctx, engines[r], RecordingReward(), RolloutGroups(2, r, 1), ROWS, 2) for r in range(2)]
    for e, start in zip(engines, (0, 2)):  # two prompts each; the seed follows the shard's first request
        (prompts, params), = e.calls
        assert prompts == [encode(r["problem"]) for r in ROWS[start:start + 2]]
        assert params.seed == 3 * 100_003 + 2 + start * N
    shards[0][1]["time_rollout"], shards[1][1]["time_rollout"] = 1.5, 4.0
    batch, m = rl.gather_shards(shards)
    assert [s.__dict__ for s in batch.samples] == [s.__dict__ for s in single[0].samples]
    assert m["reward_exact"] == pytest.approx(single[1]["reward_exact"])
    assert m["time_rollout"] == 4.0  # the slowest engine's


# --- advantages ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.25, 3.0])
def test_lampo_advantages_use_the_configured_temperature(tau):
    out = chain(f"rl.algorithm.lampo_temperature={tau}")
    want = lampo_by_hand(REWARDS, [g for *_, g in expected_rows()], scores(True), tau)
    other = lampo_by_hand(REWARDS, [g for *_, g in expected_rows()], scores(True), 1.0)
    assert max(abs(a - b) for a, b in zip(want, other)) > 1e-3  # the fixture can tell tau from 1
    assert out["batch"].advantages.tolist() == pytest.approx(want, abs=1e-6)
    assert out["tb"].advantages.tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.25])
def test_lampo_advantages_use_the_configured_pair_weight(tau):
    """``rl.algorithm.lampo_weight`` reaches the estimator and the pairwise diagnostics (with the temperature)."""
    groups, s = [g for *_, g in expected_rows()], scores(True)
    out = chain("rl.algorithm.lampo_weight=preference", f"rl.algorithm.lampo_temperature={tau}")
    want = preference_by_hand(REWARDS, groups, s, tau)
    other = lampo_by_hand(REWARDS, groups, s, tau)
    assert max(abs(a - b) for a, b in zip(want, other)) > 1e-3  # the fixture can tell the two forms apart
    assert out["batch"].advantages.tolist() == pytest.approx(want, abs=1e-6)
    assert out["tb"].advantages.tolist() == pytest.approx(want, abs=1e-6)
    assert out["metrics"]["pairwise_weight_mean"] == pytest.approx(preference_weight_mean(REWARDS, groups, s, tau),
                                                                   abs=1e-6)
    default = chain(f"rl.algorithm.lampo_temperature={tau}")  # confidence: the same gaps, 1 - that weight mean
    assert default["batch"].advantages.tolist() == pytest.approx(other, abs=1e-6)
    assert default["metrics"]["pairwise_weight_mean"] == pytest.approx(
        1 - preference_weight_mean(REWARDS, groups, s, tau), abs=1e-6)


@pytest.mark.parametrize("normalized", [True, False])
def test_sequence_scores_follow_length_normalized_score(normalized):
    out = chain(f"rl.algorithm.length_normalized_score={str(normalized).lower()}")
    groups = [g for *_, g in expected_rows()]
    want = lampo_by_hand(REWARDS, groups, scores(normalized), 1.0)
    other = lampo_by_hand(REWARDS, groups, scores(not normalized), 1.0)
    assert max(abs(a - b) for a, b in zip(want, other)) > 1e-3  # the fixture can tell mean from sum
    assert out["batch"].advantages.tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_other_estimators_get_the_same_rewards_and_groups(estimator):
    out = chain(f"rl.algorithm.advantage={estimator}")
    adv = out["batch"].advantages
    for g in range(4):
        r = torch.tensor(REWARDS[g * N:(g + 1) * N])
        dev = r - r.mean()
        want = dev / (r.std() + 1e-6) if estimator == "grpo" else dev * N / (N - 1)
        assert adv[g * N:(g + 1) * N].tolist() == pytest.approx(want.tolist(), abs=1e-5)


def test_old_logprobs_are_recomputed_by_the_trainer():
    out = chain()
    backend, tb = out["backend"], out["tb"]
    assert not any(ref for _, ref in backend.logprob_calls)  # kl_coef = 0: no reference pass
    assert sorted(called_rows(backend, reference=False)) == sorted(tuple(p + r) for p, r, _ in expected_rows())
    assert torch.equal(tb.old_logprobs, policy_logprobs(tb))
    assert tb.ref_logprobs is None
    assert all(b.ref_logprobs is None for b in backend.steps)


def test_without_recompute_the_engines_logprobs_are_the_old_ones():
    out = chain("rl.algorithm.recompute_old_logprobs=false")
    backend, tb = out["backend"], out["tb"]
    assert backend.logprob_calls == []
    for i, (p, resp, _) in enumerate(expected_rows()):
        want = [engine_logprob(t, k) for k, t in enumerate(resp)]
        assert tb.old_logprobs[i, len(p):len(p) + len(resp)].tolist() == pytest.approx(want)
    want = lampo_by_hand(REWARDS, [g for *_, g in expected_rows()],
                         [sum(engine_logprob(t, k) for k, t in enumerate(r)) / len(r) for _, r, _ in expected_rows()],
                         1.0)
    assert out["batch"].advantages.tolist() == pytest.approx(want, abs=1e-6)


def test_kl_gets_the_reference_policys_logprobs():
    out = chain("rl.algorithm.kl_coef=0.05")
    backend, tb = out["backend"], out["tb"]
    every = sorted(tuple(p + r) for p, r, _ in expected_rows())
    assert sorted(called_rows(backend, reference=True)) == every  # each row once through the reference policy
    assert sorted(called_rows(backend, reference=False)) == every
    assert tb.ref_logprobs is not None and torch.equal(tb.ref_logprobs, reference_logprobs(tb))
    assert not torch.allclose(tb.ref_logprobs, tb.old_logprobs)
    for b in backend.steps:
        assert b.ref_logprobs is not None and torch.equal(b.ref_logprobs, reference_logprobs(b))


# --- dynamic sampling: the token batch keeps exactly the informative groups, aligned with the rollout batch ----------
def test_dynamic_sampling_trains_only_on_groups_with_unequal_rewards():
    out = chain("rl.algorithm.dynamic_sampling=true")
    batch, tb, backend = out["batch"], out["tb"], out["backend"]
    keep, stats = drop_uniform_groups(batch.rewards, batch.group_index)
    assert keep.nonzero().squeeze(-1).tolist() == INFORMATIVE and stats["groups_dropped"] == 2
    kept = batch.subset(keep)
    # the token batch is the kept rollout rows, in order, each with its own advantage and old log-probs
    assert [row_key(tb, i) for i in range(len(tb))] == [sample_key(s) for s in kept.samples]
    assert tb.advantages.tolist() == pytest.approx(kept.advantages.tolist())
    whole = batch.to_token_batch(PAD).select(keep)  # the rows the library filter picks from the whole token batch
    assert torch.equal(tb.input_ids, whole.input_ids) and torch.equal(tb.response_mask, whole.response_mask)
    assert torch.equal(tb.old_logprobs, policy_logprobs(tb))
    assert sorted(k for rows in trained_rows(backend) for k in rows) == sorted(sample_key(s) for s in kept.samples)
    assert out["metrics"]["uniform_group_frac"] == pytest.approx(0.5)
    assert out["metrics"]["dynamic_groups_dropped"] == 2 and out["metrics"]["dynamic_rows_dropped"] == len(REWARDS) / 2
    # the rollout record says which rows were trained on: exactly the token batch's
    assert [s.metadata["trained"] for s in batch.samples] == keep.tolist()


def test_without_dynamic_sampling_every_row_is_trained():
    out = chain()
    assert len(out["tb"]) == len(REWARDS)
    assert all(s.metadata["trained"] for s in out["batch"].samples)
    assert sorted(k for rows in trained_rows(out["backend"]) for k in rows) == sorted(
        tuple(p + r) for p, r, _ in expected_rows())
    assert out["metrics"]["uniform_group_frac"] == pytest.approx(0.5)  # measured either way


# --- update: epochs of shuffled mini-batches, each row with its own data ---------------------------------------------
@pytest.mark.parametrize("epochs,mini", [(1, 16), (2, 16), (3, 5), (2, 4)])
def test_update_runs_ppo_epochs_of_mini_batches_over_every_row(epochs, mini):
    out = chain(f"rl.algorithm.ppo_epochs={epochs}", f"rl.mini_batch_size={mini}")
    steps = trained_rows(out["backend"])
    per_epoch = -(-len(REWARDS) // mini)
    assert len(steps) == epochs * per_epoch
    every = sorted(tuple(p + r) for p, r, _ in expected_rows())
    for e in range(epochs):
        epoch = steps[e * per_epoch:(e + 1) * per_epoch]
        assert [len(b) for b in epoch] == [min(mini, len(REWARDS) - k * mini) for k in range(per_epoch)]
        assert sorted(k for b in epoch for k in b) == every  # each row once per epoch
    if epochs > 1 and mini < len(REWARDS):
        assert steps[:per_epoch] != steps[per_epoch:2 * per_epoch]  # reshuffled every epoch


def test_each_trained_row_carries_its_own_advantage_and_logprobs():
    out = chain("rl.algorithm.ppo_epochs=2", "rl.mini_batch_size=3", "rl.algorithm.kl_coef=0.1",
                "rl.algorithm.lampo_temperature=0.5")
    adv = {sample_key(s): s.advantage for s in out["batch"].samples}
    assert len(set(adv.values())) > 2
    for b in out["backend"].steps:
        for i in range(len(b)):
            assert b.advantages[i].item() == pytest.approx(adv[row_key(b, i)], abs=1e-7)
        assert torch.equal(b.old_logprobs, policy_logprobs(b))
        assert torch.equal(b.ref_logprobs, reference_logprobs(b))
        for i in range(len(b)):  # the response mask covers exactly that row's response tokens
            p = next(p for p, r, _ in expected_rows() if tuple(p + r) == row_key(b, i))
            n, width = int(b.attention_mask[i].sum()), b.input_ids.shape[1]
            assert b.response_mask[i].tolist() == [0.0] * len(p) + [1.0] * (n - len(p)) + [0.0] * (width - n)


def test_update_order_is_a_function_of_seed_and_iteration():
    a = trained_rows(chain("rl.mini_batch_size=4", it=7)["backend"])
    b = trained_rows(chain("rl.mini_batch_size=4", it=7)["backend"])
    c = trained_rows(chain("rl.mini_batch_size=4", it=8)["backend"])
    assert a == b and a != c


def test_update_merges_metrics_mean_and_ratio_max_as_a_max():
    out = chain("rl.algorithm.ppo_epochs=2", "rl.mini_batch_size=5")
    backend, m = out["backend"], out["update"]
    ratios = [1.0 + 0.1 * ((k * 7) % 5) for k in range(1, len(backend.steps) + 1)]
    assert m["ratio_max"] == pytest.approx(max(ratios))
    assert m["step"] == pytest.approx(sum(range(1, len(backend.steps) + 1)) / len(backend.steps))
    assert m["rows"] == pytest.approx(len(REWARDS) * 2 / len(backend.steps))


def test_update_with_nothing_to_train_makes_no_step():
    ctx = make_ctx(*BASE)
    backend = RecordingBackend()
    empty = TokenBatch.from_sequences([[5]], [[6]], PAD).select(slice(0, 0))
    assert rl.update(ctx, backend, empty, 0) == {} and backend.steps == []


@pytest.mark.parametrize("floor", [1.0, 0.25])
def test_run_builds_the_backend_with_the_rl_sections_optimizer_settings(monkeypatch, floor):
    """``rl.lr``, ``rl.min_lr_ratio``, ``rl.warmup_steps`` and ``rl.weight_decay`` reach the backend; its schedule
    spans every optimizer step of the stage (PPO epochs x mini-batches per iteration x iterations)."""
    from types import SimpleNamespace

    from pipeline.state import StageState

    assert make_ctx().cfg.rl.min_lr_ratio == 1.0  # the default: a constant RL learning rate, as before the field
    ctx = make_ctx(*BASE, "rl.iterations=5", "rl.prompts_per_iteration=4", "rl.algorithm.ppo_epochs=2", "rl.lr=2e-5",
                   f"rl.min_lr_ratio={floor}", "rl.warmup_steps=3", "rl.weight_decay=0.01")
    ctx.rd = SimpleNamespace(state=lambda name: StageState(name))
    ctx.stage_input = lambda name: "the-sft-model"
    seen = {}

    class Built(Exception):
        pass

    def backend(cfg, path, **kw):
        seen.update(kw, path=path, cfg=cfg)
        raise Built

    monkeypatch.setattr(rl, "backend_class", lambda name: SimpleNamespace(from_config=backend))
    with pytest.raises(Built):
        rl.run(ctx)
    assert seen["path"] == "the-sft-model" and seen["cfg"] is ctx.cfg
    assert (seen["lr"], seen["min_lr_ratio"], seen["warmup_steps"], seen["weight_decay"]) == (2e-5, floor, 3, 0.01)
    assert seen["total_steps"] == 5 * 2 * 1  # 4 prompts x 4 samples = one mini-batch of 16, two epochs, 5 iterations


# --- one optimizer step: old log-probs from the step's own forward ----------------------------------------------------
@pytest.mark.parametrize("kl", [0.0, 0.05])
def test_a_single_step_scores_with_the_steps_own_logprobs_and_trains_every_row_once(kl):
    separate = chain(f"rl.algorithm.kl_coef={kl}")
    fused = chain(f"rl.algorithm.kl_coef={kl}", on_policy=True)
    backend = fused["backend"]
    assert isinstance(fused["tb"], rl.OnPolicyStep) and backend.on_policy_calls == 1
    assert called_rows(backend, reference=False) == []  # no separate forward of the policy
    assert sorted(called_rows(backend, reference=True)) == sorted(called_rows(separate["backend"], reference=True))
    assert fused["batch"].advantages.tolist() == pytest.approx(separate["batch"].advantages.tolist(), abs=1e-6)
    assert fused["batch"].advantages.tolist() == pytest.approx(
        lampo_by_hand(REWARDS, [g for *_, g in expected_rows()], scores(True), 1.0), abs=1e-6)
    (step,) = backend.steps
    assert sorted(row_key(step, i) for i in range(len(step))) == sorted(tuple(p + r) for p, r, _ in expected_rows())
    assert torch.equal(step.old_logprobs, policy_logprobs(step))
    m = {**fused["metrics"], **fused["update"]}
    for k in ("adv_mean", "adv_std", "pairwise_weight_mean", "uniform_group_frac", "ratio_max", "rows"):
        assert m[k] == pytest.approx({**separate["metrics"], **separate["update"]}[k]), k


@pytest.mark.parametrize("overrides", [("rl.algorithm.ppo_epochs=2",), ("rl.mini_batch_size=8",),
                                       ("rl.algorithm.dynamic_sampling=true",),
                                       ("rl.algorithm.recompute_old_logprobs=false",)])
def test_several_steps_or_other_old_logprobs_keep_the_separate_forward(overrides):
    out = chain(*overrides, on_policy=True)
    assert not isinstance(out["tb"], rl.OnPolicyStep) and out["backend"].on_policy_calls == 0
