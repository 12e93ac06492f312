"""Tests for lampo.advantages: the generic contract over every registered estimator, LamPO's properties from
the project's formulation (README, "What LamPO changes in GRPO") against a plain double-loop reference, and DAPO's
uniform-group filter."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lampo.advantages as adv_mod
from lampo.advantages import (
    ADVANTAGE_ESTIMATORS,
    drop_uniform_groups,
    pairwise_weight_stats,
    sequence_scores,
    uniform_groups,
)

ESTIMATORS = sorted(ADVANTAGE_ESTIMATORS)
SETTINGS = settings(max_examples=40, deadline=None)


def call(name: str, r, g, s, **kw):
    return ADVANTAGE_ESTIMATORS[name](r, g, seq_logprob=s, **kw)


def random_batch(seed: int, n_groups: int = 6, max_size: int = 9, levels: int | None = None, dtype=torch.float64):
    """Random group sizes (1..max_size), shuffled rows, arbitrary (negative, sparse) labels; ``levels`` rounds
    rewards to a few values so that ties occur."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=gen)
    labels = torch.randperm(1000, generator=gen)[:n_groups] - 500
    g = torch.repeat_interleave(labels, sizes)
    n = g.numel()
    r = torch.randn(n, generator=gen, dtype=dtype)
    if levels is not None:
        r = torch.randint(0, levels, (n,), generator=gen).to(dtype)
    s = -3 * torch.rand(n, generator=gen, dtype=dtype)
    perm = torch.randperm(n, generator=gen)
    return r[perm], g[perm], s[perm]


def lampo_reference(r, g, s, tau):
    """The formula A_i = 2/(G-1) sum_j (r_i - r_j) w_ij written as a plain double loop, one row at a time."""
    out = []
    for i in range(len(r)):
        members = [j for j in range(len(r)) if g[j] == g[i]]
        G = len(members)
        if G == 1:
            out.append(0.0)
            continue
        total = 0.0
        for j in members:
            if j == i:
                continue
            dr = float(r[i] - r[j])
            sign = (dr > 0) - (dr < 0)
            w = 1.0 / (1.0 + math.exp(sign * float(s[i] - s[j]) / tau))  # sigmoid(-sign * ds / tau)
            total += dr * w
        out.append(2.0 / (G - 1) * total)
    return torch.tensor(out, dtype=torch.float64)


def per_group(values, g):
    return {int(k): values[g == k] for k in torch.unique(g)}


# ----------------------------------------------------------------------------------------------------------------
# the generic contract, every estimator


def test_registry_has_the_required_names_and_refuses_duplicates():
    assert {"lampo", "grpo", "dr_grpo", "rloo"} <= set(ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")(lambda *a, **k: None)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_shape_dtype_and_full_keyword_set(name):
    r, g, s = random_batch(0, dtype=torch.float32)
    out = call(name, r, g, s, temperature=0.5, scale_normalize=False, eps=1e-5)
    assert out.shape == r.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    r64, g64, s64 = random_batch(0)
    assert call(name, r64, g64, s64).dtype == torch.float64
    assert call(name, r.half(), g, s).dtype == torch.float32


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("scale", [None, True, False])
@SETTINGS
@given(seed=st.integers(0, 10**6), levels=st.sampled_from([None, 2, 3]))
def test_zero_sum_in_every_group(name, scale, seed, levels):
    r, g, s = random_batch(seed, levels=levels)
    out = call(name, r, g, s, scale_normalize=scale)
    for k, a in per_group(out, g).items():
        assert abs(float(a.sum())) < 1e-9 * max(1.0, float(a.abs().max())), (k, a)


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("scale", [None, True, False])
def test_all_equal_groups_and_singletons_get_zero(name, scale):
    g = torch.tensor([3, 3, 3, 7, 9, 9, 11, 11])
    r = torch.tensor([0.5, 0.5, 0.5, 2.0, 1.0, 1.0, 0.0, 1.0])
    s = torch.tensor([-1.0, -5.0, -0.1, -2.0, -3.0, -0.2, -1.0, -2.0])
    out = call(name, r, g, s, scale_normalize=scale)
    assert torch.equal(out[:6], torch.zeros(6))  # all-equal groups 3 and 9, singleton 7
    assert out[7] > 0 > out[6]


@pytest.mark.parametrize("name", ESTIMATORS)
@SETTINGS
@given(seed=st.integers(0, 10**6))
def test_permutation_equivariant_and_labels_arbitrary(name, seed):
    r, g, s = random_batch(seed, levels=3)
    out = call(name, r, g, s)
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed + 1))
    relabel = g * 7919 + 13  # any other injective labelling
    torch.testing.assert_close(call(name, r[perm], relabel[perm], s[perm]), out[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_groups_do_not_interact(name):
    """Computing a batch at once equals computing each group alone."""
    r, g, s = random_batch(11, n_groups=8, levels=3)
    out = call(name, r, g, s)
    for k in torch.unique(g):
        sel = g == k
        torch.testing.assert_close(call(name, r[sel], g[sel], s[sel]), out[sel], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ESTIMATORS)
@SETTINGS
@given(seed=st.integers(0, 10**6), shift=st.floats(-100, 100), scale=st.floats(0.01, 100))
def test_shift_invariance_and_scale_behaviour(name, seed, shift, scale):
    r, g, s = random_batch(seed, levels=4)
    base = call(name, r, g, s, scale_normalize=False)
    # adding a constant changes nothing
    torch.testing.assert_close(call(name, r + shift, g, s, scale_normalize=False), base, rtol=1e-9, atol=1e-9)
    # without normalisation, scaling rewards by c > 0 scales advantages by c
    torch.testing.assert_close(call(name, r * scale, g, s, scale_normalize=False), base * scale,
                               rtol=1e-9, atol=1e-9)
    # with normalisation (and eps=0), scaling changes nothing
    normed = call(name, r, g, s, scale_normalize=True, eps=0.0)
    torch.testing.assert_close(call(name, r * scale, g, s, scale_normalize=True, eps=0.0), normed,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ESTIMATORS)
@SETTINGS
@given(seed=st.integers(0, 10**6), levels=st.sampled_from([None, 2, 5]))
def test_best_and_worst_signs_never_wrong(name, seed, levels):
    r, g, s = random_batch(seed, levels=levels)
    out = call(name, r, g, s)
    for k in torch.unique(g):
        rr, aa = r[g == k], out[g == k]
        if rr.max() == rr.min():
            continue
        assert (aa[rr == rr.max()] > 0).all() and (aa[rr == rr.min()] < 0).all(), (rr, aa)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_scale_normalize_divides_by_group_std(name):
    r, g, s = random_batch(5, levels=None)
    plain = call(name, r, g, s, scale_normalize=False)
    std = torch.zeros_like(r)
    for k in torch.unique(g):
        sel = g == k
        std[sel] = r[sel].std() if sel.sum() > 1 else 0.0
    torch.testing.assert_close(call(name, r, g, s, scale_normalize=True, eps=1e-3), plain / (std + 1e-3))


def test_known_estimators_on_a_small_example():
    """Textbook definitions, written independently: GRPO, Dr. GRPO, RLOO."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    dev = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0])
    torch.testing.assert_close(call("dr_grpo", r, g, None), dev)
    torch.testing.assert_close(call("grpo", r, g, None, eps=0.0)[:4], dev[:4] / std)
    assert call("grpo", r, g, None)[4] == 0
    loo = torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 0.0])
    torch.testing.assert_close(call("rloo", r, g, None), loo)


# ----------------------------------------------------------------------------------------------------------------
# input validation, every estimator


BAD_INPUTS = [
    (lambda r, g, s: (r.clone().index_fill_(0, torch.tensor([1]), float("nan")), g, s), ValueError, "NaN"),
    (lambda r, g, s: (r.clone().index_fill_(0, torch.tensor([0]), float("inf")), g, s), ValueError, "infinite"),
    (lambda r, g, s: (r[:-1], g, s), ValueError, "entries"),
    (lambda r, g, s: (r, g, s[:-1]), ValueError, "seq_logprob"),
    (lambda r, g, s: (r[None], g, s), ValueError, "1-D"),
    (lambda r, g, s: (r, g.float(), s), TypeError, "integer"),
    (lambda r, g, s: (r, g.bool(), s), TypeError, "integer"),
    (lambda r, g, s: (r.long(), g, s), TypeError, "floating"),
    (lambda r, g, s: (r[:0], g[:0], s[:0]), ValueError, "empty"),
    (lambda r, g, s: (r.tolist(), g, s), TypeError, "Tensor"),
    (lambda r, g, s: (r, g, s.clone().fill_(float("nan"))), ValueError, "seq_logprob"),
]


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("make,exc,msg", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(name, make, exc, msg):
    r, g, s = make(*random_batch(2, dtype=torch.float32))
    with pytest.raises(exc, match=msg):
        call(name, r, g, s)


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": -1.0}, {"temperature": float("nan")},
                                {"eps": -1.0}, {"scale_normalize": "yes"}])
def test_bad_options_raise(name, kw):
    r, g, s = random_batch(3)
    with pytest.raises((ValueError, TypeError)):
        call(name, r, g, s, **kw)


def test_lampo_requires_seq_logprob():
    r, g, _ = random_batch(4)
    with pytest.raises(ValueError, match="seq_logprob"):
        ADVANTAGE_ESTIMATORS["lampo"](r, g)


# ----------------------------------------------------------------------------------------------------------------
# LamPO specifics


@SETTINGS
@given(seed=st.integers(0, 10**6), levels=st.sampled_from([None, 2, 3]), tau=st.floats(0.05, 20.0),
       max_size=st.integers(1, 12))
def test_lampo_equals_the_double_loop_reference(seed, levels, tau, max_size):
    r, g, s = random_batch(seed, levels=levels, max_size=max_size)
    torch.testing.assert_close(call("lampo", r, g, s, temperature=tau), lampo_reference(r, g, s, tau),
                               rtol=1e-10, atol=1e-12)


def test_lampo_chunked_layout_matches_reference_for_mixed_sizes(monkeypatch):
    """Tiny pair budget: many chunks, each padded to its own largest group; groups of very different sizes."""
    monkeypatch.setattr(adv_mod._padded_groups, "__defaults__", (40,))
    r, g, s = random_batch(9, n_groups=20, max_size=15, levels=3)
    torch.testing.assert_close(call("lampo", r, g, s, temperature=0.7), lampo_reference(r, g, s, 0.7),
                               rtol=1e-10, atol=1e-12)
    inv, counts = adv_mod._dense_groups(g)
    layouts = list(adv_mod._padded_groups(inv, counts, budget=40))
    assert len(layouts) > 1
    covered = sorted(torch.cat([idx[valid] for idx, valid in layouts]).tolist())
    assert covered == [i for i in range(len(g)) if counts[inv[i]] > 1]  # every non-singleton row exactly once
    for idx, valid in layouts:  # each row of a block is one whole group
        for row, ok in zip(idx, valid):
            assert len(torch.unique(inv[row[ok]])) == 1 and int(ok.sum()) == int(counts[inv[row[0]]])


@pytest.mark.parametrize("seed", range(5))
def test_lampo_tends_to_rloo_as_temperature_grows(seed):
    r, g, s = random_batch(seed, levels=3)
    rloo = call("rloo", r, g, s)
    torch.testing.assert_close(call("lampo", r, g, s, temperature=math.inf), rloo, rtol=1e-12, atol=1e-12)
    gaps = [float((call("lampo", r, g, s, temperature=t) - rloo).abs().max()) for t in (100.0, 1e4, 1e6)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5


@SETTINGS
@given(dr=st.floats(-5, 5), ds=st.floats(-5, 5), tau=st.floats(0.01, 10))
def test_pair_weight_symmetric_and_bounded(dr, ds, tau):
    w_ij = adv_mod._pair_weights(torch.tensor([dr], dtype=torch.float64), torch.tensor([ds], dtype=torch.float64), tau)
    w_ji = adv_mod._pair_weights(torch.tensor([-dr], dtype=torch.float64), torch.tensor([-ds], dtype=torch.float64),
                                 tau)
    assert torch.equal(w_ij, w_ji) and 0 <= float(w_ij) <= 1
    if dr != 0 and abs(ds) / tau > 1e-6:  # preferring the better response by a margin lowers w below 1/2
        prefers_better = (dr > 0) == (ds > 0) and ds != 0
        assert (float(w_ij) < 0.5) == prefers_better


def test_lampo_is_confidence_aware():
    """Two responses, better one first: A_best = 2 * (r1 - r2) * w, and w falls as the policy's preference for the
    better response grows (and rises towards 1 when it prefers the worse one)."""
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    gaps = torch.linspace(-6, 6, 13)
    a_best = [float(call("lampo", r, g, torch.tensor([float(d), 0.0]))[0]) for d in gaps]
    assert all(x > y for x, y in zip(a_best, a_best[1:]))
    torch.testing.assert_close(torch.tensor(a_best), 2 * torch.sigmoid(-gaps))


def test_lampo_ties_ignore_scores():
    """sign(0) = 0: two tied responses contribute nothing to each other whatever their scores."""
    r, g = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 0, 0])
    a = call("lampo", r, g, torch.tensor([-1.0, -1.0, -2.0]))
    b = call("lampo", r, g, torch.tensor([-1.0, -9.0, -2.0]))
    torch.testing.assert_close(a[0], b[0])  # row 0's only non-tied partner (row 2) is unchanged


def test_lampo_at_benchmark_size_matches_per_group_runs():
    """512 x 64 runs chunked and agrees, group by group, with the estimator run on that group alone."""
    P, G = 512, 64
    gen = torch.Generator().manual_seed(0)
    g = torch.randperm(P * G, generator=gen) % P
    r = torch.randint(0, 2, (P * G,), generator=gen).float()
    s = -3 * torch.rand(P * G, generator=gen)
    out = call("lampo", r, g, s)
    for k in (0, 17, 511):
        sel = g == k
        torch.testing.assert_close(out[sel], call("lampo", r[sel], g[sel], s[sel]))


# ----------------------------------------------------------------------------------------------------------------
# sequence scores, diagnostics, dynamic sampling


def test_sequence_scores_mean_and_sum():
    lp = torch.tensor([[9.0, -1.0, -3.0, 7.0], [float("nan"), -2.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(sequence_scores(lp, mask), torch.tensor([-2.0, -2.0, 0.0]))
    torch.testing.assert_close(sequence_scores(lp, mask, length_normalized=False), torch.tensor([-4.0, -2.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        sequence_scores(lp, torch.ones_like(mask))
    with pytest.raises(ValueError, match="B, T"):
        sequence_scores(lp[0], mask[0])


def test_pairwise_weight_stats_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 5.0])
    g = torch.tensor([0, 0, 0, 1])
    s = torch.tensor([-1.0, -3.0, -4.0, 0.0])
    st_ = pairwise_weight_stats(r, g, s, temperature=1.0)
    # pairs (0,1), (0,2), (1,2); unequal: (0,1) with policy preferring the better, (1,2) preferring the worse
    w01, w12 = torch.sigmoid(torch.tensor(-2.0)), torch.sigmoid(torch.tensor(1.0))  # w12 > 1/2: discordant
    assert st_["num_pairs"] == 3 and st_["num_unequal_pairs"] == 2
    assert st_["weight_mean"] == pytest.approx(float(w01 + w12) / 2)
    assert st_["discordant_frac"] == pytest.approx(0.5)
    assert st_["score_gap_mean"] == pytest.approx((2 + 3 + 1) / 3)
    empty = pairwise_weight_stats(torch.ones(3), torch.tensor([0, 1, 2]), torch.zeros(3))
    assert empty["num_pairs"] == 0 and empty["weight_mean"] == 0.0


@SETTINGS
@given(seed=st.integers(0, 10**6))
def test_uniform_groups_and_dynamic_sampling(seed):
    r, g, _ = random_batch(seed, levels=2, max_size=4)
    uni = uniform_groups(r, g)
    for k in torch.unique(g):
        sel = g == k
        assert bool((uni[sel] == (r[sel].max() == r[sel].min())).all())
    keep, stats = drop_uniform_groups(r, g)
    assert torch.equal(keep, ~uni)
    n_groups = len(torch.unique(g))
    assert stats["groups"] == n_groups and stats["rows_dropped"] == float(uni.sum())
    assert stats["groups_dropped"] == len(torch.unique(g[uni]))
    assert stats["frac_groups_dropped"] == pytest.approx(stats["groups_dropped"] / n_groups)
    # every kept group has a non-zero advantage somewhere; every dropped one is all zero
    a = call("lampo", r, g, -torch.rand(len(r)))
    assert torch.equal(a[uni], torch.zeros(int(uni.sum()), dtype=a.dtype))
