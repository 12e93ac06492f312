"""Tests for lampo.losses: invariances over every registered policy loss and aggregation mode, clipping behaviour
read off the gradients, KL estimator properties, entropy, and input checks."""
from __future__ import annotations

import math

import pytest
import torch

from lampo.losses import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    loss_normalizers,
    policy_objective,
)

LOSSES = sorted(POLICY_LOSSES)
AGGS = sorted(LOSS_AGGREGATIONS)
CLIP = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None}


def make_batch(seed: int = 0, B: int = 8, T: int = 12, noise: float = 0.3):
    """Right-padded batch with prompts of different lengths and responses of different lengths (one of them empty
    when B >= 8), float64 so that equalities can be tight."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        start = int(torch.randint(1, 4, (), generator=gen))
        length = 0 if b == 5 else int(torch.randint(1, T - start + 1, (), generator=gen))
        mask[b, start:start + length] = 1.0
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    new = old + noise * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = old + noise * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=gen, dtype=torch.float64)
    return new, old, adv, mask, ref, entropy


# ----------------------------------------------------------------------------------------------------------------
# registries


def test_registries_hold_the_required_names():
    assert {"ppo_clip", "gspo"} <= set(POLICY_LOSSES)
    assert set(AGGS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-sum-constant"}
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(KeyError, match="known"):
        policy_objective(*make_batch()[:4], policy_loss="nope")


# ----------------------------------------------------------------------------------------------------------------
# aggregation and gradient accumulation


def test_aggregate_modes_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 7.0, 8.0]])
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]])
    assert aggregate(v, m, "token-mean") == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert aggregate(v, m, "seq-mean-token-mean") == pytest.approx((2 + 5) / 2)
    assert aggregate(v, m, "seq-mean-token-sum") == pytest.approx((6 + 5) / 2)
    assert aggregate(v, m, "seq-sum-constant") == pytest.approx(11 / (2 * 4))
    assert aggregate(v, m, "seq-sum-constant", max_len=10) == pytest.approx(11 / (2 * 10))
    v[0, 3] = float("nan")  # outside the mask: never read
    assert aggregate(v, m, "token-mean") == pytest.approx(11 / 4)
    assert aggregate(v, torch.zeros_like(m), "token-mean") == 0  # nothing to train on: 0, not NaN
    with pytest.raises(KeyError, match="known"):
        aggregate(v, m, "mean")


@pytest.mark.parametrize("policy_loss", LOSSES)
@pytest.mark.parametrize("agg", AGGS)
def test_eight_micro_batches_of_one_equal_one_batch_of_eight(policy_loss, agg):
    """Global normalisers make gradient accumulation exact: loss and gradients of 8 x 1 sum to those of 1 x 8."""
    new, old, adv, mask, ref, ent = make_batch(1, noise=0.4)
    kw = dict(policy_loss=policy_loss, loss_agg=agg, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0,
              clip_low=0.2, clip_high=0.28)
    norm = loss_normalizers(mask, max_len=16)

    whole = new.clone().requires_grad_()
    ent_whole = ent.clone().requires_grad_()
    loss, _ = policy_objective(whole, old, adv, mask, ref_logprobs=ref, entropy=ent_whole, **norm, **kw)
    loss.backward()

    parts = new.clone().requires_grad_()
    ent_parts = ent.clone().requires_grad_()
    total = 0.0
    for b in range(len(new)):
        sl = slice(b, b + 1)
        part, _ = policy_objective(parts[sl], old[sl], adv[sl], mask[sl], ref_logprobs=ref[sl],
                                   entropy=ent_parts[sl], **norm, **kw)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ent_parts.grad, ent_whole.grad, rtol=1e-12, atol=1e-14)
    assert whole.grad.abs().sum() > 0


def test_metrics_describe_the_micro_batch_and_merge_by_token_weight():
    new, old, adv, mask, ref, ent = make_batch(2, noise=0.5)
    norm = loss_normalizers(mask)
    _, full = policy_objective(new, old, adv, mask, ref_logprobs=ref, entropy=ent, kl_coef=0.1)
    merged: dict[str, float] = {}
    for b in range(len(new)):
        sl = slice(b, b + 1)
        _, m = policy_objective(new[sl], old[sl], adv[sl], mask[sl], ref_logprobs=ref[sl], entropy=ent[sl],
                                kl_coef=0.1, **norm)
        _, alone = policy_objective(new[sl], old[sl], adv[sl], mask[sl], ref_logprobs=ref[sl], entropy=ent[sl],
                                    kl_coef=0.1)
        assert m == pytest.approx(alone)  # the global counts change the loss's scale, not the metrics
        w = float(mask[sl].sum()) / norm["num_tokens"]
        for k, v in m.items():
            merged[k] = max(merged.get(k, -math.inf), v) if k.endswith("_max") else merged.get(k, 0.0) + w * v
    assert merged == pytest.approx(full)  # token-mean: token-weighted merge is exact for every metric


# ----------------------------------------------------------------------------------------------------------------
# the surrogate itself


@pytest.mark.parametrize("policy_loss", LOSSES)
def test_ratio_one_gives_minus_advantage_per_token(policy_loss):
    _, old, adv, mask, _, _ = make_batch(3)
    lp = old.clone().requires_grad_()
    per_token, metrics = POLICY_LOSSES[policy_loss](lp, old, adv, mask, **CLIP)
    torch.testing.assert_close(per_token, -adv[:, None] * mask)
    assert float(metrics["clip_frac_low"].sum() + metrics["clip_frac_high"].sum()) == 0
    per_token.sum().backward()  # d/dlogprob of -A * ratio at ratio 1 is -A on every response token
    if policy_loss == "ppo_clip":
        torch.testing.assert_close(lp.grad, -adv[:, None] * mask)


def _ppo_grad(ratio: float, a: float, dual_clip: float | None = None) -> float:
    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, _ = POLICY_LOSSES["ppo_clip"](lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([a]),
                                        torch.ones(1, 1), clip_low=0.2, clip_high=0.3, dual_clip=dual_clip)
    loss.sum().backward()
    return float(lp.grad)


@pytest.mark.parametrize("ratio,a,zero", [
    (1.5, +1.0, True),   # good response already pushed up past 1 + clip_high: no more push
    (1.1, +1.0, False),  # inside the trust region
    (0.5, +1.0, False),  # good response pushed down: still corrected (pessimistic bound)
    (0.5, -1.0, True),   # bad response already pushed down past 1 - clip_low: no more push
    (0.9, -1.0, False),
    (1.5, -1.0, False),  # bad response pushed up: still corrected
])
def test_clipping_zeroes_gradients_outside_the_trust_region_in_the_right_direction(ratio, a, zero):
    g = _ppo_grad(ratio, a)
    assert (g == 0) == zero
    if not zero:  # gradient descent moves log-prob towards the advantage's sign
        assert g * a < 0


def test_dual_clip_caps_negative_advantages_only():
    assert _ppo_grad(5.0, -1.0, dual_clip=3.0) == 0  # ratio beyond the dual clip: capped, no gradient
    assert _ppo_grad(2.0, -1.0, dual_clip=3.0) != 0  # below it: unchanged
    assert _ppo_grad(2.0, -1.0, dual_clip=3.0) == _ppo_grad(2.0, -1.0)
    lp = torch.log(torch.tensor([[5.0, 2.0], [5.0, 2.0]], dtype=torch.float64))
    zero = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([-2.0, 2.0], dtype=torch.float64)
    loss, m = POLICY_LOSSES["ppo_clip"](lp, zero, adv, torch.ones(2, 2), clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[6.0, 4.0], [-2.6, -2.6]], dtype=torch.float64))
    assert m["dual_clip_frac"].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert m["clip_frac_high"].tolist() == [[0.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("agg", AGGS)
def test_gspo_reduces_to_ppo_when_all_token_ratios_are_equal(agg):
    _, old, _, mask, _, _ = make_batch(4)
    shift = torch.tensor([0.1, -0.3, 0.5, 0.0, -0.05, 0.2, 0.15, -0.25], dtype=torch.float64)[:, None]
    adv = torch.tensor([0.5, -1.0, 2.0, 1.0, -0.3, 1.5, -2.0, 0.7], dtype=torch.float64)  # rows 1, 2 get clipped
    results = []
    for name in ("ppo_clip", "gspo"):
        lp = (old + shift).requires_grad_()
        loss, metrics = policy_objective(lp, old, adv, mask, policy_loss=name, loss_agg=agg, clip_low=0.2,
                                         clip_high=0.28)
        loss.backward()
        results.append((loss.detach(), lp.grad, metrics))
    (l1, g1, m1), (l2, g2, m2) = results
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(g2, g1)
    assert m2 == pytest.approx(m1)
    assert m1["clip_frac_high"] > 0 and m1["clip_frac_low"] > 0  # both clip sides were exercised


def test_gspo_uses_the_sequence_ratio():
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[0.3, -0.1, 0.1]], dtype=torch.float64)  # mean log-ratio 0.1
    loss, m = POLICY_LOSSES["gspo"](lp, old, torch.tensor([1.0]), torch.ones(1, 3), clip_low=0.2, clip_high=0.2,
                                    dual_clip=None)
    torch.testing.assert_close(m["ratio"], torch.full((1, 3), math.exp(0.1), dtype=torch.float64))
    torch.testing.assert_close(loss, torch.full((1, 3), -math.exp(0.1), dtype=torch.float64))


def test_clip_options_are_checked():
    args = make_batch()[:4]
    for bad in ({"clip_low": 1.0}, {"clip_low": -0.1}, {"clip_high": -0.1}, {"dual_clip": 1.0}):
        with pytest.raises(ValueError):
            policy_objective(*args, **bad)


# ----------------------------------------------------------------------------------------------------------------
# KL and entropy


@pytest.mark.parametrize("est", sorted(KL_ESTIMATORS))
def test_kl_estimators_zero_at_equality_and_k2_k3_nonnegative(est):
    _, old, _, _, ref, _ = make_batch(5, noise=2.0)
    assert torch.equal(kl_penalty(old, old, est), torch.zeros_like(old))
    if est != "k1":
        assert (kl_penalty(old, ref, est) >= 0).all()


def test_kl_estimators_expectations():
    """Samples from pi: k1 and k3 are unbiased for KL(pi || ref); k2 is close when pi ~ ref."""
    gen = torch.Generator().manual_seed(0)
    logits_pi, logits_ref = torch.randn(6, generator=gen, dtype=torch.float64), None
    logits_ref = logits_pi + 0.3 * torch.randn(6, generator=gen, dtype=torch.float64)
    log_pi, log_ref = logits_pi.log_softmax(0), logits_ref.log_softmax(0)
    true_kl = float((log_pi.exp() * (log_pi - log_ref)).sum())
    # exact expectations over the categorical: sum_x pi(x) * k(x)
    for est, tol in (("k1", 1e-12), ("k3", 1e-12), ("k2", 0.1 * true_kl)):
        expected = float((log_pi.exp() * kl_penalty(log_pi[None], log_ref[None], est)[0]).sum())
        assert expected == pytest.approx(true_kl, abs=tol), est
    # and by sampling, with variance k3 < k1
    samples = torch.multinomial(log_pi.exp(), 200_000, replacement=True, generator=gen)
    k1 = kl_penalty(log_pi[samples][None], log_ref[samples][None], "k1")
    k3 = kl_penalty(log_pi[samples][None], log_ref[samples][None], "k3")
    assert float(k3.mean()) == pytest.approx(true_kl, rel=0.05)
    assert float(k3.var()) < float(k1.var())


def test_kl_coef_zero_needs_no_reference_and_positive_coef_does():
    new, old, adv, mask, ref, _ = make_batch(6)
    loss, m = policy_objective(new, old, adv, mask)
    assert "kl" not in m
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_objective(new, old, adv, mask, kl_coef=0.1)
    with_kl, m2 = policy_objective(new, old, adv, mask, kl_coef=0.1, ref_logprobs=ref)
    expected = aggregate(kl_penalty(new, ref, "k3"), mask, "token-mean")
    torch.testing.assert_close(with_kl, loss + 0.1 * expected)
    assert m2["kl"] == pytest.approx(float(expected))
    logged, m3 = policy_objective(new, old, adv, mask, ref_logprobs=ref)  # kl_coef 0: logged, not in the loss
    torch.testing.assert_close(logged, loss)
    assert m3["kl"] == pytest.approx(m2["kl"])


def test_entropy_from_logits_matches_the_definition_with_and_without_grad():
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 5, 50, generator=gen, dtype=torch.float64)
    p = logits.softmax(-1)
    reference = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), reference)
    x = logits.clone().requires_grad_()
    h = entropy_from_logits(x)
    torch.testing.assert_close(h, reference)
    h.sum().backward()
    y = logits.clone().requires_grad_()
    (-(y.softmax(-1) * y.log_softmax(-1)).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad)
    big = torch.tensor([[[1e4, 0.0, -1e4]]])  # no overflow: logsumexp-based
    assert torch.isfinite(entropy_from_logits(big)).all() and float(entropy_from_logits(big)) == pytest.approx(0.0)
    assert entropy_from_logits(logits.to(torch.bfloat16)).dtype == torch.float32
    uniform = torch.zeros(1, 1, 8)
    assert float(entropy_from_logits(uniform)) == pytest.approx(math.log(8))


def test_entropy_bonus_enters_the_loss_with_minus_sign():
    new, old, adv, mask, _, ent = make_batch(7)
    base, _ = policy_objective(new, old, adv, mask, entropy=ent)
    bonus, m = policy_objective(new, old, adv, mask, entropy=ent, entropy_coef=0.5)
    torch.testing.assert_close(bonus, base - 0.5 * aggregate(ent, mask, "token-mean"))
    assert m["entropy"] == pytest.approx(float(aggregate(ent, mask, "token-mean")))
    with pytest.raises(ValueError, match="entropy"):
        policy_objective(new, old, adv, mask, entropy_coef=0.5)


# ----------------------------------------------------------------------------------------------------------------
# the objective's contract


@pytest.mark.parametrize("policy_loss", LOSSES)
def test_metrics_are_floats_and_make_sense(policy_loss):
    new, old, adv, mask, ref, ent = make_batch(8, noise=0.6)
    loss, m = policy_objective(new.float(), old.float(), adv.float(), mask, policy_loss=policy_loss,
                               ref_logprobs=ref.float(), entropy=ent.float(), kl_coef=0.1, dual_clip=2.0)
    expected = {"loss", "pg_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
                "approx_kl", "ratio_mean", "ratio_max"}
    assert set(m) == expected and all(type(v) is float for v in m.values())
    assert m["loss"] == pytest.approx(float(loss))
    assert 0 <= m["clip_frac_low"] <= 1 and 0 <= m["clip_frac_high"] <= 1 and m["approx_kl"] >= 0
    assert m["ratio_max"] >= m["ratio_mean"] > 0
    assert loss.dtype == torch.float32 and loss.dim() == 0


def test_padding_values_are_never_read():
    new, old, adv, mask, ref, _ = make_batch(9)
    loss, m = policy_objective(new, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    pad = mask == 0
    garbage = [t.masked_fill(pad, v) for t, v in ((new, float("nan")), (old, -float("inf")), (ref, float("inf")))]
    lp = garbage[0].clone().requires_grad_()
    loss2, m2 = policy_objective(lp, garbage[1], adv, mask, ref_logprobs=garbage[2], kl_coef=0.1)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    assert m2 == pytest.approx(m)
    assert torch.isfinite(lp.grad).all() and (lp.grad[pad] == 0).all()


@pytest.mark.parametrize("field", ["logprobs", "old_logprobs", "advantages", "ref_logprobs", "entropy"])
def test_nan_on_response_tokens_raises_floating_point_error(field):
    new, old, adv, mask, ref, ent = make_batch(10)
    args = {"logprobs": new, "old_logprobs": old, "advantages": adv, "ref_logprobs": ref, "entropy": ent}
    t = args[field].clone()
    if field == "advantages":
        t[2] = float("nan")
    else:
        t[mask.bool()] = t[mask.bool()].index_fill(0, torch.tensor([3]), float("nan"))
    args[field] = t
    with pytest.raises(FloatingPointError, match=field):
        policy_objective(args["logprobs"], args["old_logprobs"], args["advantages"], mask,
                         ref_logprobs=args["ref_logprobs"], entropy=args["entropy"], kl_coef=0.1)


def test_shape_errors_say_what_is_wrong():
    new, old, adv, mask, ref, _ = make_batch(11)
    with pytest.raises(ValueError, match="advantages"):
        policy_objective(new, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_objective(new, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="B, T"):
        policy_objective(new[0], old[0], adv, mask[0])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_objective(new, old, adv, mask, ref_logprobs=ref[:-1], kl_coef=0.1)
