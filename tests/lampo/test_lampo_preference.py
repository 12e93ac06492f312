"""Tests for ``lampo(..., pair_weight="preference")``, the alternative form of LamPO's pair weights:

    w_ij = sigmoid((s_i - s_j) / tau),    A_i = sum_{j != i} w_ij (r_i - r_j) / sum_{j != i} w_ij

against a plain double-loop reference, and its properties: RLOO at tau = inf, NOT zero-sum (unlike the default
"confidence" form), shift- and permutation-invariant, monotonic in the own reward, 0 for all-equal groups; plus the
``pair_weight`` option's validation across the estimator registry and in ``pairwise_weight_stats``."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lampo.advantages as adv_mod
from lampo.advantages import ADVANTAGE_ESTIMATORS, PAIR_WEIGHTS, pairwise_weight_stats

ESTIMATORS = sorted(ADVANTAGE_ESTIMATORS)
SETTINGS = settings(max_examples=60, deadline=None)
DTYPES = [torch.float32, torch.float64]
# tolerances against the float64 reference: float32 inputs are computed in float32
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
TAUS = st.one_of(st.sampled_from([0.05, 0.3, 1.0, 7.5, math.inf]), st.floats(0.05, 20.0))


def pref(r, g, s, **kw):
    return ADVANTAGE_ESTIMATORS["lampo"](r, g, seq_logprob=s, pair_weight="preference", **kw)


def conf(r, g, s, **kw):
    return ADVANTAGE_ESTIMATORS["lampo"](r, g, seq_logprob=s, pair_weight="confidence", **kw)


def preference_reference(r, g, s, tau) -> torch.Tensor:
    """The preference form as a plain double loop in Python floats (float64), one row at a time."""
    r, g, s = [float(x) for x in r], [int(x) for x in g], [float(x) for x in s]
    out = []
    for i in range(len(r)):
        num = den = 0.0
        for j in range(len(r)):
            if j == i or g[j] != g[i]:
                continue
            w = 1.0 / (1.0 + math.exp(-(s[i] - s[j]) / tau))  # sigmoid((s_i - s_j) / tau); tau = inf: 1/2
            num += w * (r[i] - r[j])
            den += w
        out.append(num / den if den else 0.0)  # no other member: a group of one gets 0
    return torch.tensor(out, dtype=torch.float64)


@st.composite
def batches(draw, dtype=None, max_size: int = 10):
    """Random group sizes (1..max_size, singletons included), arbitrary sparse labels, rows shuffled so that groups
    are not contiguous, rewards with or without ties, scores in a plausible range; float32 or float64."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=6))
    labels = draw(st.lists(st.integers(-10**6, 10**6), min_size=len(sizes), max_size=len(sizes), unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.sampled_from([None, 2, 3]))
    gen = torch.Generator().manual_seed(seed)
    g = torch.repeat_interleave(torch.tensor(labels), torch.tensor(sizes))
    n = g.numel()
    r = torch.randn(n, generator=gen, dtype=torch.float64) if levels is None else \
        torch.randint(0, levels, (n,), generator=gen).double()
    s = -3 * torch.rand(n, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    return r[perm].to(dtype), g[perm], s[perm].to(dtype)


def groups_of(g):
    return [g == k for k in torch.unique(g)]


# ----------------------------------------------------------------------------------------------------------------
# the vectorised estimator against the double loop


@SETTINGS
@given(batch=batches(), tau=TAUS)
def test_preference_equals_the_double_loop_reference(batch, tau):
    r, g, s = batch
    out = pref(r, g, s, temperature=tau)
    assert out.dtype == r.dtype and out.shape == r.shape
    torch.testing.assert_close(out.double(), preference_reference(r, g, s, tau), **TOL[r.dtype])


def test_preference_chunked_layout_matches_reference_for_mixed_sizes(monkeypatch):
    """Tiny pair budget: many chunks, each padded to its own largest group, so padding rows and columns occur."""
    monkeypatch.setattr(adv_mod._padded_groups, "__defaults__", (40,))
    gen = torch.Generator().manual_seed(9)
    sizes = torch.tensor([1, 15, 2, 7, 3, 1, 11, 4, 9, 2, 5, 6])
    g = torch.repeat_interleave(torch.randperm(100, generator=gen)[:len(sizes)] * 3 - 50, sizes)
    perm = torch.randperm(g.numel(), generator=gen)
    g = g[perm]
    r = torch.randint(0, 3, (g.numel(),), generator=gen).double()
    s = -3 * torch.rand(g.numel(), generator=gen, dtype=torch.float64)
    inv, counts = adv_mod._dense_groups(g)
    assert len(list(adv_mod._padded_groups(inv, counts, budget=40))) > 1
    for tau in (0.4, 2.0, math.inf):
        torch.testing.assert_close(pref(r, g, s, temperature=tau), preference_reference(r, g, s, tau),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_preference_stays_finite_where_every_weight_underflows(dtype):
    """Response 0 is scored 300 nats below the others (summed scores get there): every sigmoid((s_0 - s_j)/tau)
    underflows in float32, yet the weighted average is well defined, w_01 : w_02 = 1 : e."""
    r = torch.tensor([0.0, 1.0, 2.0], dtype=dtype)
    g = torch.zeros(3, dtype=torch.long)
    s = torch.tensor([-300.0, 0.0, -1.0], dtype=dtype)
    out = pref(r, g, s)
    assert torch.isfinite(out).all()
    want = preference_reference(r, g, s, 1.0)
    want[0] = (1 * (0 - 1) + math.e * (0 - 2)) / (1 + math.e)  # exp(-300) cancels out of the ratio
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


# ----------------------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_preference_at_infinite_temperature_is_rloo(dtype, seed):
    """tau = inf: every w_ij = 1/2, so A_i = mean_{j != i} (r_i - r_j) = RLOO's advantage (equal up to rounding,
    as for the confidence form); and the gap to RLOO shrinks as tau grows."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (7,), generator=gen)
    g = torch.repeat_interleave(torch.arange(7) * 5 - 11, sizes)[torch.randperm(int(sizes.sum()), generator=gen)]
    r = torch.randint(0, 4, (g.numel(),), generator=gen).to(dtype)
    s = (-3 * torch.rand(g.numel(), generator=gen)).to(dtype)
    rloo = ADVANTAGE_ESTIMATORS["rloo"](r, g)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(pref(r, g, s, temperature=math.inf), rloo, **tol)
    if dtype == torch.float64:
        gaps = [float((pref(r, g, s, temperature=t) - rloo).abs().max()) for t in (10.0, 1e3, 1e5)]
        assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5


def test_preference_is_not_zero_sum_but_confidence_is():
    """A concrete group of three where the preference form's advantages do not sum to 0, by hand."""
    r = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    g = torch.zeros(3, dtype=torch.long)
    s = torch.tensor([-1.0, -1.0, -5.0], dtype=torch.float64)

    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    a0 = 1.0  # both of its gaps are 1, whatever the weights
    a1 = sig(0.0) * (0 - 1) / (sig(0.0) + sig(4.0))  # the tie with row 2 adds weight but no gap
    a2 = sig(-4.0) * (0 - 1) / (sig(-4.0) + sig(-4.0))  # = -1/2
    out = pref(r, g, s)
    torch.testing.assert_close(out, torch.tensor([a0, a1, a2], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert float(out.sum()) > 0.15  # 1 - 0.337 - 0.5 = 0.163
    assert abs(float(conf(r, g, s).sum())) < 1e-12  # the default form is zero-sum on the same group


@SETTINGS
@given(batch=batches(dtype=torch.float64), tau=TAUS, data=st.data())
def test_preference_invariant_to_a_constant_shift_of_each_groups_rewards(batch, tau, data):
    r, g, s = batch
    shifts = {int(k): data.draw(st.floats(-100, 100)) for k in torch.unique(g)}  # a different constant per group
    shifted = r + torch.tensor([shifts[int(k)] for k in g], dtype=r.dtype)
    torch.testing.assert_close(pref(shifted, g, s, temperature=tau), pref(r, g, s, temperature=tau),
                               rtol=1e-9, atol=1e-9)


@SETTINGS
@given(batch=batches(), tau=TAUS, seed=st.integers(0, 10**6))
def test_preference_equivariant_to_permuting_rows(batch, tau, seed):
    r, g, s = batch
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(pref(r[perm], g[perm], s[perm], temperature=tau), pref(r, g, s, temperature=tau)[perm],
                               **TOL[r.dtype])


@SETTINGS
@given(batch=batches(dtype=torch.float64), tau=TAUS, delta=st.floats(0.01, 10.0), data=st.data())
def test_preference_monotonic_in_the_own_reward(batch, tau, delta, data):
    """Raising r_i by delta raises A_i by exactly delta (its weights do not depend on rewards) when i has a group
    mate, lowers every mate's advantage, and leaves the other groups alone."""
    r, g, s = batch
    i = data.draw(st.integers(0, len(r) - 1))
    before = pref(r, g, s, temperature=tau)
    raised = r.clone()
    raised[i] += delta
    after = pref(raised, g, s, temperature=tau)
    mates = (g == g[i]) & (torch.arange(len(r)) != i)
    if mates.any():
        assert float(after[i] - before[i]) == pytest.approx(delta, rel=1e-9, abs=1e-9)
        # a mate's change is -delta * (its weight on i) / (its weight sum): negative, though it may round away when
        # that weight is tiny (small tau); at tau = inf it is -delta / (G - 1)
        assert bool((after[mates] <= before[mates] + 1e-12).all())
        if tau == math.inf:
            torch.testing.assert_close(after[mates] - before[mates],
                                       torch.full_like(before[mates], -delta / int(mates.sum())))
    else:
        assert after[i] == before[i] == 0
    torch.testing.assert_close(after[g != g[i]], before[g != g[i]], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.1, 1.0, math.inf])
def test_preference_all_equal_groups_and_singletons_get_exactly_zero(dtype, tau):
    g = torch.tensor([3, 7, 3, 9, 9, 3, 11, 11, 9])
    r = torch.tensor([0.5, 2.0, 0.5, 1e6, 1e6, 0.5, 0.0, 1.0, 1e6], dtype=dtype)
    s = torch.tensor([-1.0, -2.0, -5.0, -3.0, -0.2, -0.1, -1.0, -2.0, -40.0], dtype=dtype)
    out = pref(r, g, s, temperature=tau)
    uniform = (g == 3) | (g == 9) | (g == 7)  # groups 3 and 9 all equal, 7 a singleton
    assert torch.equal(out[uniform], torch.zeros(int(uniform.sum()), dtype=dtype))
    assert out[7] > 0 > out[6]  # group 11: a pair, A = +-(r_i - r_j) whatever the weights
    torch.testing.assert_close(out[6:8], torch.tensor([-1.0, 1.0], dtype=dtype))


@SETTINGS
@given(batch=batches(dtype=torch.float64), tau=TAUS)
def test_preference_best_and_worst_signs_and_scale_normalisation(batch, tau):
    """The best response of a group gets > 0 and the worst < 0 (weighted averages of gaps of one sign); the
    shared scale normalisation divides by the group's reward std as for every estimator."""
    r, g, s = batch
    out = pref(r, g, s, temperature=tau)
    for sel in groups_of(g):
        rr, aa = r[sel], out[sel]
        if rr.max() > rr.min():
            assert (aa[rr == rr.max()] > 0).all() and (aa[rr == rr.min()] < 0).all(), (rr, aa)
    std = torch.zeros_like(r)
    for sel in groups_of(g):
        std[sel] = r[sel].std() if sel.sum() > 1 else 0.0
    torch.testing.assert_close(pref(r, g, s, temperature=tau, scale_normalize=True, eps=1e-3), out / (std + 1e-3))


@SETTINGS
@given(ds=st.floats(-50, 50), tau=st.one_of(st.floats(0.01, 10), st.just(math.inf)))
def test_preference_weights_are_the_policys_preference(ds, tau):
    """w_ij = sigmoid((s_i - s_j)/tau): w_ij + w_ji = 1, above 1/2 exactly when the policy scores i higher."""
    def w(x):
        return float(adv_mod._preference_log_weights(torch.tensor([x], dtype=torch.float64), tau).exp())
    w_ij, w_ji = w(ds), w(-ds)
    assert w_ij + w_ji == pytest.approx(1.0, abs=1e-12)
    x = ds / tau
    want = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))  # no overflow either side
    assert w_ij == pytest.approx(want, rel=1e-12, abs=1e-300)
    if ds / tau > 1e-9:
        assert w_ij > 0.5


# ----------------------------------------------------------------------------------------------------------------
# the option itself: validation, the other estimators, diagnostics


def test_pair_weights_lists_the_default_first():
    assert PAIR_WEIGHTS == ("confidence", "preference")


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("bad", ["bogus", "Preference", "", None, 1])
def test_a_wrong_pair_weight_raises_naming_the_allowed_values(name, bad):
    r = torch.tensor([1.0, 0.0, 2.0])
    g = torch.tensor([0, 0, 0])
    s = torch.tensor([-1.0, -2.0, -0.5])
    with pytest.raises(ValueError, match=r"pair_weight must be one of 'confidence', 'preference'"):
        ADVANTAGE_ESTIMATORS[name](r, g, seq_logprob=s, pair_weight=bad)
    with pytest.raises(ValueError, match="pair_weight must be one of"):
        pairwise_weight_stats(r, g, s, pair_weight=bad)


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n != "lampo"])
@pytest.mark.parametrize("scale", [None, True, False])
def test_other_estimators_ignore_pair_weight(name, scale):
    gen = torch.Generator().manual_seed(3)
    g = torch.tensor([4, 1, 4, 4, 1, 8, 4, 1])
    r = torch.randint(0, 3, (8,), generator=gen).float()
    s = -3 * torch.rand(8, generator=gen)
    fn = ADVANTAGE_ESTIMATORS[name]
    base = fn(r, g, seq_logprob=s, scale_normalize=scale)
    for pw in PAIR_WEIGHTS:
        assert torch.equal(fn(r, g, seq_logprob=s, pair_weight=pw, scale_normalize=scale), base)


def test_confidence_is_the_default():
    gen = torch.Generator().manual_seed(4)
    g = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    r = torch.randint(0, 2, (7,), generator=gen).double()
    s = -3 * torch.rand(7, generator=gen, dtype=torch.float64)
    assert torch.equal(ADVANTAGE_ESTIMATORS["lampo"](r, g, seq_logprob=s), conf(r, g, s))
    assert pairwise_weight_stats(r, g, s) == pairwise_weight_stats(r, g, s, pair_weight="confidence")


def test_pairwise_weight_stats_report_the_preference_weights():
    """Same example as the confidence form's by-hand test: unequal pairs (0,1) (policy prefers the better) and
    (1,2) (policy prefers the worse); each reports sigmoid((s_better - s_worse)/tau)."""
    r = torch.tensor([1.0, 0.0, 1.0, 5.0])
    g = torch.tensor([0, 0, 0, 1])
    s = torch.tensor([-1.0, -3.0, -4.0, 0.0])
    for tau in (1.0, 0.5):
        st_ = pairwise_weight_stats(r, g, s, temperature=tau, pair_weight="preference")
        w01, w21 = 1 / (1 + math.exp(-2.0 / tau)), 1 / (1 + math.exp(1.0 / tau))  # better first: (0 over 1), (2 over 1)
        assert st_["num_pairs"] == 3 and st_["num_unequal_pairs"] == 2
        assert st_["weight_mean"] == pytest.approx((w01 + w21) / 2)
        assert st_["discordant_frac"] == pytest.approx(0.5) and st_["score_gap_mean"] == pytest.approx(2.0)
        confidence = pairwise_weight_stats(r, g, s, temperature=tau)
        assert st_["weight_mean"] == pytest.approx(1 - confidence["weight_mean"])
    assert pairwise_weight_stats(torch.ones(3), torch.tensor([0, 1, 2]), torch.zeros(3),
                                 pair_weight="preference")["weight_mean"] == 0.0
