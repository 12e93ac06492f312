"""An RL iteration that takes a single optimizer step takes its old log-probs from that step's own forward
(``TrainingBackend.rl_step_on_policy``): no separate no-grad forward, the same update. Also: the torch backend's
length-sorted micro-batches, non-finite old log-probs (skipped, counted, never an error from lampo's checks), and the
step's loss helpers without host syncs.

The RL stage's own functions (``advantages`` -> ``update``) run here on the real torch backend with
``backend.old_logprobs_from_step=never`` (the separate forward, as before) and ``always``: the same weights after."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lampo.record import RolloutBatch, Sample, TokenBatch
from pipeline.backends import base
from pipeline.backends.common import length_sorted_micro_batches
from pipeline.backends.torch_backend import TorchBackend
from pipeline.config import load_config
from pipeline.stages import rl
from pipeline.tiny.model import create_tiny_checkpoint
from tests.pipeline.test_torch_backend import SMALL, STEP_ATOL, random_batch, weights

G = 4  # samples per prompt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", SMALL, seed=0)


def rollout(seed: int, prompts: int = 3) -> RolloutBatch:
    """``prompts`` groups of G responses of different lengths, rewards mixed within every group."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for p in range(prompts):
        prompt = torch.randint(3, 20, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        for k in range(G):
            resp = torch.randint(3, 20, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            samples.append(Sample(prompt_ids=prompt, response_ids=resp, group=p, reward=float((k + p) % 2)
                                  + 0.1 * float(torch.rand((), generator=g))))
    return RolloutBatch(samples)


def make(ckpt, *, micro: int, mode: str, advantage: str = "lampo", **over):
    cfg = load_config(None, [f"backend.micro_batch_size={micro}", f"backend.old_logprobs_from_step={mode}",
                             f"rl.algorithm.advantage={advantage}", f"rollout.n_samples={G}", "rl.mini_batch_size=64",
                             "rl.algorithm.lampo_temperature=0.05", *[f"{k}={v}" for k, v in over.items()]])
    backend = TorchBackend.from_config(cfg, ckpt, lr=1e-2, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    skipped: list[str] = []
    ctx = SimpleNamespace(cfg=cfg, pad_id=0, note_skipped_step=lambda b, stage, m, where: skipped.append(where))
    return ctx, backend, skipped


def one_iteration(ckpt, seed: int = 0, **kw):
    """advantages -> update, as ``rl.run`` chains them; counts the backend's separate policy forwards."""
    ctx, backend, skipped = make(ckpt, **kw)
    calls = []
    real = backend.token_logprobs
    backend.token_logprobs = lambda b, reference=False: calls.append(reference) or real(b, reference=reference)
    batch = rollout(seed)
    tb, m = rl.advantages(ctx, backend, batch)
    m = {**m, **rl.update(ctx, backend, tb, 0)}
    return SimpleNamespace(backend=backend, batch=batch, tb=tb, metrics=m, policy_forwards=calls.count(False),
                           skipped=skipped)


@pytest.mark.parametrize("micro", [64, 5], ids=["one-micro-batch", "several-micro-batches"])
@pytest.mark.parametrize("advantage", ["lampo", "grpo"])
def test_one_step_gives_the_same_update_without_the_separate_forward(ckpt, advantage, micro):
    initial = weights(make(ckpt, micro=micro, mode="never")[1])
    off = one_iteration(ckpt, micro=micro, mode="never", advantage=advantage)
    on = one_iteration(ckpt, micro=micro, mode="always", advantage=advantage)
    assert isinstance(on.tb, rl.OnPolicyStep) and not isinstance(off.tb, rl.OnPolicyStep)
    assert (off.policy_forwards, on.policy_forwards) == (1, 0)
    assert on.backend.step == off.backend.step == 1 and on.metrics["skipped_updates"] == 0
    # the same advantages (LamPO's from the step's own log-probs), written into the rollout batch
    torch.testing.assert_close(on.batch.advantages, off.batch.advantages, atol=1e-5, rtol=0)
    assert on.batch.advantages.abs().max() > 0.1
    torch.testing.assert_close(on.tb.tb.old_logprobs, off.tb.old_logprobs, atol=1e-5, rtol=0)
    assert set(on.metrics) == set(off.metrics)
    for k in ("loss", "pg_loss", "grad_norm", "adv_mean", "pairwise_weight_mean", "ratio_max", "entropy"):
        assert on.metrics[k] == pytest.approx(off.metrics[k], rel=1e-4, abs=1e-6), k
    assert on.metrics["ratio_max"] == 1.0 and on.metrics["clip_frac_low"] == on.metrics["clip_frac_high"] == 0.0
    moved = max((off_w - initial[k]).abs().max().item() for k, off_w in weights(off.backend).items())
    assert moved > 100 * STEP_ATOL  # the step did something the comparison below can see
    for k, w in weights(off.backend).items():
        torch.testing.assert_close(weights(on.backend)[k], w, atol=STEP_ATOL, rtol=0)


def test_the_comparison_sees_a_wrong_score(ckpt):
    """The LamPO step depends on the scores taken from the step's log-probs: with the scores of other log-probs the
    weights differ by far more than the tolerance of the test above (so that test would catch a fused path that
    scored, e.g., the wrong rows)."""
    on = one_iteration(ckpt, micro=5, mode="always")
    ctx, wrong, _ = make(ckpt, micro=5, mode="never")
    batch = rollout(0)
    tb = batch.to_token_batch(0)
    noisy = wrong.token_logprobs(tb) + 0.5 * torch.rand(tb.input_ids.shape, generator=torch.Generator().manual_seed(1))
    tb.advantages = rl.score_and_advantages(ctx, batch, noisy * tb.response_mask, tb.response_mask, {})
    tb.old_logprobs = wrong.token_logprobs(tb)
    wrong.rl_step(tb)
    diff = max((w - weights(on.backend)[k]).abs().max().item() for k, w in weights(wrong).items())
    assert diff > 20 * STEP_ATOL


@pytest.mark.parametrize("over,fused", [
    ({}, True),  # auto, on the CPU: fused even with several micro-batches
    ({"backend.old_logprobs_from_step": "never"}, False),
    ({"rl.algorithm.ppo_epochs": 2}, False),
    ({"rl.mini_batch_size": 6}, False),  # 12 sequences: two optimizer steps
    ({"rl.algorithm.dynamic_sampling": "true"}, False),
    ({"rl.algorithm.recompute_old_logprobs": "false"}, False),  # the engine's log-probs are another policy's
])
def test_when_the_step_takes_its_own_old_logprobs(ckpt, over, fused):
    ctx, backend, _ = make(ckpt, micro=5, mode=over.pop("backend.old_logprobs_from_step", "auto"), **over)
    batch = rollout(0)
    for s in batch.samples:
        s.response_logprobs = [-1.0] * len(s.response_ids)
    tb, _ = rl.advantages(ctx, backend, batch)
    assert isinstance(tb, rl.OnPolicyStep) == fused


def test_auto_needs_one_micro_batch_off_the_cpu(ckpt):
    _, b, _ = make(ckpt, micro=5, mode="auto")
    b.device = torch.device("meta")  # stands for an accelerator: only the decision is asked
    assert b.fuses_old_logprobs(5) and not b.fuses_old_logprobs(6)
    b.options.old_logprobs_from_step = "always"
    assert b.fuses_old_logprobs(6)


def test_kl_still_runs_the_reference_forward(ckpt):
    ctx, backend, _ = make(ckpt, micro=5, mode="always", **{"rl.algorithm.kl_coef": 0.1})
    backend.reference = TorchBackend.from_config(ctx.cfg, ckpt, lr=1e-2, total_steps=10).model.eval()
    batch = rollout(0)
    tb, _ = rl.advantages(ctx, backend, batch)
    assert isinstance(tb, rl.OnPolicyStep) and tb.tb.ref_logprobs is not None
    m = rl.update(ctx, backend, tb, 0)
    assert m["skipped_updates"] == 0 and abs(m["kl"]) < 1e-6  # the reference is the initial policy


# --- non-finite old log-probs: the step is skipped and counted, lampo's input checks never see them ---------------
@pytest.mark.parametrize("mode", ["never", "always"])
def test_nan_old_logprobs_from_the_trainer_skip_the_update(ckpt, mode):
    ctx, backend, skipped = make(ckpt, micro=5, mode=mode)
    row = 2
    if mode == "never":  # the separate forward returns a NaN on a response token
        real = backend.token_logprobs

        def token_logprobs(b, reference=False):
            lp = real(b, reference=reference)
            lp[row, b.response_mask[row].nonzero()[0]] = float("nan")
            return lp
        backend.token_logprobs = token_logprobs
    else:  # the step's own forward does (the log-probs it reads from the model's output)
        target = rollout(0).to_token_batch(0)
        n = int(target.attention_mask[row].sum())
        target = target.input_ids[row, :n]
        real = backend._per_token

        def per_token(output, mb, *, entropy):
            lp, ent = real(output, mb, entropy=entropy)
            for i in range(len(mb)):
                if mb.attention_mask[i].sum() == n and torch.equal(mb.input_ids[i, :n], target):
                    lp = lp.clone()
                    lp[i, n - 1] = float("nan")
            return lp, ent
        backend._per_token = per_token
    before = weights(backend)
    batch = rollout(0)
    tb, m = rl.advantages(ctx, backend, batch)
    m = {**m, **rl.update(ctx, backend, tb, 0)}
    assert m["nonfinite_old_logprobs"] == 1.0 and m["skipped_updates"] == 1.0 and math.isnan(m["loss"])
    assert skipped == ["iteration 1, update 1 of 1"] and backend.step == 0 and backend.skipped_updates == 1
    assert all(torch.equal(w, before[k]) for k, w in weights(backend).items())
    assert torch.isfinite(batch.advantages).all()


def test_nan_logprobs_from_the_engine_skip_the_update(ckpt):
    ctx, backend, skipped = make(ckpt, micro=5, mode="auto", **{"rl.algorithm.recompute_old_logprobs": "false"})
    batch = rollout(0)
    for s in batch.samples:
        s.response_logprobs = [-1.0] * len(s.response_ids)
    batch.samples[5].response_logprobs[-1] = float("-inf")
    tb, m = rl.advantages(ctx, backend, batch)
    m = {**m, **rl.update(ctx, backend, tb, 0)}
    assert m["nonfinite_old_logprobs"] == 1.0 and m["skipped_updates"] == 1.0 and backend.step == 0
    assert skipped == ["iteration 1, update 1 of 1"]


# --- length-sorted micro-batches --------------------------------------------------------------------------------------
def test_micro_batches_are_sorted_by_length_and_cut_to_their_longest():
    batch = random_batch(7, n=11)
    batch.advantages = torch.arange(11.0)
    parts = length_sorted_micro_batches(batch, 4)
    assert [len(mb) for _, mb in parts] == [4, 4, 3]
    rows = torch.cat([r for r, _ in parts])
    assert sorted(rows.tolist()) == list(range(11))
    lengths = batch.attention_mask.sum(1)
    assert lengths[rows].tolist() == sorted(lengths.tolist(), reverse=True)
    for r, mb in parts:
        assert mb.input_ids.shape[1] == int(lengths[r].max())  # no column of padding only
        assert torch.equal(mb.input_ids, batch.input_ids[r, :mb.input_ids.shape[1]])
        assert torch.equal(mb.advantages, batch.advantages[r])
        assert mb.attention_mask.sum() == lengths[r].sum()  # nothing real was cut
    (rows, whole), = length_sorted_micro_batches(batch, 11)  # one micro-batch: row order kept, padding cut
    assert rows.tolist() == list(range(11)) and whole.input_ids.shape[1] == int(lengths.max())


def test_token_logprobs_keep_the_batch_order_and_layout(ckpt):
    _, b, _ = make(ckpt, micro=3, mode="never")
    batch = random_batch(8, n=7)
    lp = b.token_logprobs(batch)
    assert lp.shape == batch.input_ids.shape and torch.all(lp[batch.attention_mask == 0] == 0)
    for i in range(len(batch)):  # each row alone, unpadded
        n = int(batch.attention_mask[i].sum())
        alone = b.token_logprobs(TokenBatch(batch.input_ids[i:i + 1, :n], batch.attention_mask[i:i + 1, :n],
                                            batch.response_mask[i:i + 1, :n]))
        torch.testing.assert_close(lp[i, :n], alone[0], atol=1e-5, rtol=1e-5)


# --- the step's loss helpers decide without a host sync ---------------------------------------------------------------
def test_poisoning_and_the_non_finite_test_need_no_host_sync(monkeypatch):
    def refuse(*_):
        raise AssertionError("host sync")

    mask = torch.tensor([[0.0, 1.0, 1.0]])
    ok, nan_on_pad = torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[float("nan"), -1.0, -2.0]])
    bad = torch.tensor([[0.0, -1.0, float("inf")]])
    loss = torch.tensor(2.0, requires_grad=True)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    flags = [base._bad_on(mask, t, torch.zeros(1)) for t in (ok, nan_on_pad, bad)]
    results = [base._poisoned(loss, f) for f in flags] + [base._poisoned(loss * math.inf)]
    monkeypatch.undo()
    assert [bool(f) for f in flags] == [False, False, True]
    assert [r.item() for r in results[:2]] == [2.0, 2.0] and all(math.isnan(r.item()) for r in results[2:])


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-sum-constant"])
def test_every_merged_metric_is_independent_of_the_split(ckpt, loss_agg):
    """Micro-batch metrics merge exactly (token means by tokens, loss-like metrics of a seq-* aggregation by
    sequences), so a backend that cuts the batch differently (the torch backend sorts by length) reports the same."""
    batch = random_batch(1, n=9)
    noise = 0.05 * torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(5))
    batch.old_logprobs = (make(ckpt, micro=9, mode="never")[1].token_logprobs(batch) + noise) * batch.response_mask
    got = [make(ckpt, micro=micro, mode="never", **{"rl.algorithm.loss_agg": loss_agg})[1].rl_step(batch)
           for micro in (9, 2, 4)]
    assert "num_seqs" not in got[0]
    for m in got[1:]:
        assert m.keys() == got[0].keys()
        for k, v in got[0].items():
            assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
