"""Advantage estimators: ``(rewards, group_index, ...) -> advantages``, one registry, one call contract.

Every estimator in :data:`ADVANTAGE_ESTIMATORS` is called the same way (the driver never special-cases a name)::

    fn(rewards, group_index, *, seq_logprob=None, temperature=1.0, pair_weight="confidence", scale_normalize=None,
       eps=1e-6) -> advantages

* ``rewards`` float (N,); ``group_index`` integer (N,) naming each response's prompt group (groups need not be
  contiguous, sorted, or of equal size; any integer labels); ``seq_logprob`` float (N,), the behaviour policy's
  sequence score s_i (see :func:`sequence_scores`; only ``lampo`` uses it, the others accept and ignore it);
* ``temperature``: tau of LamPO's pairwise weights (``math.inf`` is allowed: it gives RLOO exactly);
* ``pair_weight``: which form of LamPO's pairwise weights, one of :data:`PAIR_WEIGHTS`: ``"confidence"`` (the
  default, the project's adopted form: symmetric weights, zero-sum advantages) or ``"preference"`` (the policy's own
  preference for i over j, a weighted average over j; not zero-sum). See :func:`lampo`. Only ``lampo`` uses it; the
  others validate it and ignore it, as they do ``temperature``;
* ``scale_normalize``: divide each advantage by its group's reward standard deviation (+ ``eps``); ``None`` means the
  estimator's own default (``grpo``: True; ``dr_grpo``, ``rloo``, ``lampo``: False);
* returns float (N,) in float32 (or float64 when the rewards are float64). A group of one response gets 0.

Estimators are vectorised over all groups at once. Advantages are constants of the RL objective, so everything runs
under ``torch.no_grad``.

Also here: :func:`sequence_scores` (the s_i), :func:`pairwise_weight_stats` (LamPO diagnostics for TensorBoard) and
DAPO's dynamic sampling (:func:`uniform_groups`, :func:`drop_uniform_groups`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor

from lampo.registry import Registry


class AdvantageFn(Protocol):
    def __call__(self, rewards: Tensor, group_index: Tensor, *, seq_logprob: Tensor | None = None,
                 temperature: float = 1.0, pair_weight: str = "confidence", scale_normalize: bool | None = None,
                 eps: float = 1e-6) -> Tensor: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")

# The forms of LamPO's pairwise weights (the ``pair_weight`` option; see :func:`lampo`), the default first.
PAIR_WEIGHTS: tuple[str, ...] = ("confidence", "preference")

# Most (group, i, j) pair entries materialised at once by the pairwise code: 2**18 float32 = 1 MiB for each of the
# three work buffers, which every chunk reuses. Measured on the 2-core CPU box at 512 groups x 64: with reused buffers
# budgets from 2**17 to 2**24 all take about 4-5 ms, so the smaller memory wins; below 2**16 per-chunk Python
# overhead shows (2**15: about 11 ms). Without buffer reuse, fresh multi-MiB tensors page-faulted on every call and
# the estimator took 10-20 ms whenever other work had run in between.
_PAIR_BUDGET = 1 << 18


# --------------------------------------------------------------------------------------------------------------------
# input checks and group bookkeeping


def _check_vector(name: str, t: object, *, floating: bool, n: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}; convert it with .float()")
    if not floating and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of group labels, got {t.dtype}; convert it with .long()")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: an advantage needs at least one response")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries but rewards has {n}; they must describe the same responses")
    if floating and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has NaN or infinite values (first at rows {bad}); fix the reward/score upstream")
    return t


def _check_inputs(rewards: Tensor, group_index: Tensor, seq_logprob: Tensor | None, temperature: float,
                  eps: float, scale_normalize: bool | None,
                  pair_weight: str = "confidence") -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate the shared call contract; return rewards (and scores) in the working dtype (float32 or float64)."""
    rewards = _check_vector("rewards", rewards, floating=True)
    n = rewards.numel()
    _check_vector("group_index", group_index, floating=False, n=n)
    if group_index.device != rewards.device:
        raise ValueError(f"group_index is on {group_index.device} but rewards on {rewards.device}")
    if seq_logprob is not None:
        _check_vector("seq_logprob", seq_logprob, floating=True, n=n)
        if seq_logprob.device != rewards.device:
            raise ValueError(f"seq_logprob is on {seq_logprob.device} but rewards on {rewards.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (math.inf allowed), got {temperature!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if scale_normalize is not None and not isinstance(scale_normalize, bool):
        raise TypeError(f"scale_normalize must be True, False or None, got {scale_normalize!r}")
    if not isinstance(pair_weight, str) or pair_weight not in PAIR_WEIGHTS:
        raise ValueError(f"pair_weight must be one of {', '.join(map(repr, PAIR_WEIGHTS))}, got {pair_weight!r}")
    work = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    s = None if seq_logprob is None else seq_logprob.detach().to(work)
    return rewards.detach().to(work), group_index.detach(), s


def _dense_groups(group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Arbitrary integer labels -> ``inv`` (N,) dense group id in [0, P) and ``counts`` (P,) group sizes."""
    _, inv, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    return inv, counts


def _group_sum(x: Tensor, inv: Tensor, num_groups: int) -> Tensor:
    return x.new_zeros(num_groups).index_add_(0, inv, x)  # (P,)


def _group_deviation(r: Tensor, inv: Tensor, counts: Tensor) -> Tensor:
    """r_i - mean of i's group (N,). Each group is first shifted by its own minimum (an exact operation), so a group
    of equal rewards gives exactly 0 at any reward scale, and large common offsets cost no precision."""
    num_groups = counts.numel()
    low = r.new_full((num_groups,), math.inf).scatter_reduce(0, inv, r, "amin")
    x = r - low[inv]
    return x - (_group_sum(x, inv, num_groups) / counts)[inv]


def _group_std(r: Tensor, inv: Tensor, counts: Tensor) -> Tensor:
    """Unbiased (Bessel-corrected, like ``torch.std``) reward std per group (P,); 0 for groups of one response."""
    d = _group_deviation(r, inv, counts)
    return (_group_sum(d * d, inv, counts.numel()) / (counts - 1).clamp_min(1)).sqrt()


def _padded_groups(inv: Tensor, counts: Tensor, budget: int = _PAIR_BUDGET) -> Iterator[tuple[Tensor, Tensor]]:
    """Lay the groups of two or more rows out as padded blocks: yields ``idx`` (Pc, Gc) long row indices and
    ``valid`` (Pc, Gc) bool (False on padding, whose idx is 0).

    Groups are ordered largest first and cut into chunks whose padded pair count Pc * Gc**2 stays within ``budget``
    (512 groups of 64 make 8 chunks of 64 groups), each chunk padded only to its own largest group. So memory is
    bounded whatever the mix of group sizes (a single group larger than sqrt(budget) is one chunk of its own), and
    the loop is over chunks, never over groups.
    """
    num_groups = counts.numel()
    by_size = torch.argsort(counts, descending=True, stable=True)  # (P,) group ids, largest first
    rank = torch.empty_like(by_size)
    rank[by_size] = torch.arange(num_groups, device=counts.device)
    rows = torch.argsort(rank[inv], stable=True)  # (N,) row ids sorted by their group's rank
    sizes = counts[by_size]  # (P,) descending
    starts = torch.cumsum(sizes, 0) - sizes  # (P,) first position of each ranked group in `rows`
    sizes_list = sizes.tolist()
    n_multi = sum(1 for g in sizes_list if g >= 2)  # singletons are skipped: their advantage is 0
    a = 0
    while a < n_multi:
        width = sizes_list[a]
        b = min(n_multi, a + max(1, budget // (width * width)))
        k = torch.arange(width, device=counts.device)
        valid = k < sizes[a:b, None]  # (Pc, Gc)
        pos = torch.where(valid, starts[a:b, None] + k, 0)
        yield rows[pos], valid
        a = b


def _pair_weights(dr: Tensor, ds: Tensor, temperature: float, sign_buffer: Tensor | None = None) -> Tensor:
    """LamPO's confidence-aware pair weight w_ij = sigmoid(-sign(r_i - r_j) * (s_i - s_j) / tau), elementwise.

    ``dr`` = r_i - r_j and ``ds`` = s_i - s_j, any matching shape. Symmetric: w(dr, ds) == w(-dr, -ds).
    Computed in place: ``ds`` is overwritten and returned, and sign(dr) goes to ``sign_buffer`` when given (the
    pairwise tensors are large; on CPU, fresh multi-MiB allocations cost more than the arithmetic).
    """
    return ds.mul_(torch.sign(dr, out=sign_buffer)).mul_(-1.0 / temperature).sigmoid_()


def _preference_log_weights(ds: Tensor, temperature: float, buffer: Tensor | None = None) -> Tensor:
    """log of the preference-form pair weight, log w_ij = log sigmoid((s_i - s_j) / tau), elementwise.

    ``ds`` = s_i - s_j; w_ij + w_ji = 1. Logs, not weights: the weights of a far-behind response underflow (float32
    sigmoid is 0 below about -104, a gap that summed scores reach easily), while their ratios, which are all that the
    weighted average uses, stay representable. In place: ``ds`` is overwritten and returned; ``buffer`` (same shape)
    is scratch. log sigmoid(z) = min(z, 0) - log1p(exp(-|z|)), finite for every finite z; tau = inf gives -log 2.
    """
    z = ds.mul_(1.0 / temperature)
    tail = torch.abs(z, out=buffer).neg_().exp_().log1p_()
    return z.clamp_(max=0.0).sub_(tail)


# --------------------------------------------------------------------------------------------------------------------
# the estimators

_Core = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float, str], Tensor]


def _estimator(name: str, *, scale_default: bool) -> Callable[[_Core], AdvantageFn]:
    """Wrap a core ``(r, inv, counts, s, tau, pair_weight) -> (N,)`` into the public contract and register it under
    ``name``.

    The wrapper validates the inputs, maps group labels to dense ids, and applies the optional scale normalisation,
    so every estimator checks and normalises the same way.
    """

    def deco(core: _Core) -> AdvantageFn:
        def fn(rewards: Tensor, group_index: Tensor, *, seq_logprob: Tensor | None = None, temperature: float = 1.0,
               pair_weight: str = "confidence", scale_normalize: bool | None = None, eps: float = 1e-6) -> Tensor:
            with torch.no_grad():
                r, g, s = _check_inputs(rewards, group_index, seq_logprob, temperature, eps, scale_normalize,
                                        pair_weight)
                inv, counts = _dense_groups(g)
                adv = core(r, inv, counts, s, float(temperature), pair_weight)
                if scale_default if scale_normalize is None else scale_normalize:
                    denom = _group_std(r, inv, counts)[inv] + eps  # 0 only where the group is uniform and eps=0
                    adv = torch.where(denom > 0, adv / denom.clamp_min(torch.finfo(r.dtype).tiny), 0.0)
                return adv

        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = core.__doc__
        fn.__module__ = core.__module__
        return ADVANTAGE_ESTIMATORS.register(name)(fn)

    return deco


@_estimator("grpo", scale_default=True)
def grpo(r: Tensor, inv: Tensor, counts: Tensor, s: Tensor | None, tau: float, pair_weight: str) -> Tensor:
    """GRPO (DeepSeekMath): A_i = (r_i - mean_g r) / (std_g r + eps); scale normalisation on by default.

    The std is the unbiased (Bessel-corrected) one, as ``torch.std`` gives and common implementations use.
    """
    return _group_deviation(r, inv, counts)


@_estimator("dr_grpo", scale_default=False)
def dr_grpo(r: Tensor, inv: Tensor, counts: Tensor, s: Tensor | None, tau: float, pair_weight: str) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean_g r, without the std division (the other half of Dr. GRPO, the constant loss
    normaliser, is the ``seq-sum-constant`` aggregation in :mod:`lampo.losses`)."""
    return _group_deviation(r, inv, counts)


@_estimator("rloo", scale_default=False)
def rloo(r: Tensor, inv: Tensor, counts: Tensor, s: Tensor | None, tau: float, pair_weight: str) -> Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean_g r); 0 for a group of one."""
    g = counts[inv].to(r.dtype)
    return torch.where(g > 1, _group_deviation(r, inv, counts) * g / (g - 1).clamp_min(1), 0.0)


def _pair_blocks(r: Tensor, inv: Tensor, counts: Tensor) -> Iterator[tuple[Tensor, Tensor, tuple[Tensor, ...]]]:
    """:func:`_padded_groups`' blocks, each with three (Pc, Gc, Gc) work views into buffers of r's dtype that every
    chunk reuses (fresh big allocations page-fault on CPU). Yields ``idx``, ``valid``, ``(buf0, buf1, buf2)``."""
    chunks = list(_padded_groups(inv, counts))
    numel = max((idx.shape[0] * idx.shape[1] ** 2 for idx, _ in chunks), default=0)
    work = r.new_empty(3, numel)
    for idx, valid in chunks:
        pc, gc = idx.shape
        yield idx, valid, tuple(buf[: pc * gc * gc].view(pc, gc, gc) for buf in work)


@_estimator("lampo", scale_default=False)
def lampo(r: Tensor, inv: Tensor, counts: Tensor, s: Tensor | None, tau: float, pair_weight: str) -> Tensor:
    """LamPO's pairwise decomposed advantage (arXiv 2605.21235). The default, ``pair_weight="confidence"``, is the
    project's adopted form (the README's "What LamPO changes in GRPO" states it too):

        w_ij = sigmoid(-sign(r_i - r_j) * (s_i - s_j) / tau),    A_i = 2/(G-1) * sum_{j != i} (r_i - r_j) * w_ij

    with s_i = ``seq_logprob`` (required), tau = ``temperature``, G the size of i's group.

    Where the paper is only in words, these choices are ours: the RankNet-style sigmoid of the behaviour policy's
    score gap as the pair weight; the 2/(G-1) factor, chosen so that tau -> inf (w = 1/2) gives exactly the RLOO
    advantage; sign(0) = 0, so tied rewards contribute nothing whatever their scores; a group of one response gets 0;
    scale normalisation (divide by the group's unbiased reward std + eps, as GRPO) is optional and off by default.
    Properties: zero-sum per group, all-equal groups get 0, shift-invariant, scales with rewards, and the best
    (worst) response of a group never gets a negative (positive) advantage.

    ``pair_weight="preference"`` is the alternative form of a secondary summary of the paper: the weight is the
    policy's own preference for i over j (not symmetric: w_ij + w_ji = 1) and A_i a weighted average over j,

        w_ij = sigmoid((s_i - s_j) / tau),                       A_i = sum_{j != i} w_ij (r_i - r_j) / sum_{j != i} w_ij

    tau -> inf (w = 1/2) gives RLOO's mean_{j != i} (r_i - r_j) exactly; tied rewards add nothing to the numerator but
    do count in the denominator. It is NOT zero-sum per group in general (each row averages with its own weights);
    it keeps the other properties above (and dA_i/dr_i = 1: monotonic in the own reward). The ratio is formed from
    log-weights, so it stays finite and accurate where every weight of a row underflows (a response the policy scores
    far below the rest of its group, or a small tau).

    Vectorised over groups by :func:`_padded_groups`: O(sum_g G_g**2) work, memory bounded by ``_PAIR_BUDGET``.
    """
    if s is None:
        raise ValueError("the lampo estimator needs seq_logprob (N,), the behaviour policy's sequence scores s_i; "
                         "compute them with lampo.advantages.sequence_scores(old_logprobs, response_mask)")
    if pair_weight == "preference":
        return _lampo_preference(r, inv, counts, s, tau)
    out = torch.zeros_like(r)
    for idx, valid, (dr, ds, sign) in _pair_blocks(r, inv, counts):
        R, S = r[idx], s[idx]  # (Pc, Gc)
        torch.sub(R[:, :, None], R[:, None, :], out=dr)  # (Pc, Gc, Gc): r_i - r_j
        if not valid.all():
            dr.mul_(valid[:, None, :])  # 0 where j is padding, so padding adds nothing
        torch.sub(S[:, :, None], S[:, None, :], out=ds)  # s_i - s_j
        w = _pair_weights(dr, ds, tau, sign_buffer=sign)  # (Pc, Gc, Gc)
        size = valid.sum(1, keepdim=True).to(r.dtype)  # (Pc, 1), >= 2
        adv = torch.einsum("pij,pij->pi", dr, w) * (2.0 / (size - 1))  # (Pc, Gc): sum_j (r_i - r_j) w_ij
        out[idx[valid]] = adv[valid]
    return out


def _lampo_preference(r: Tensor, inv: Tensor, counts: Tensor, s: Tensor, tau: float) -> Tensor:
    """``lampo`` with ``pair_weight="preference"``: A_i = sum_{j != i} w_ij (r_i - r_j) / sum_{j != i} w_ij,
    w_ij = sigmoid((s_i - s_j) / tau). The weights of row i are rescaled by their largest (a softmax over j of
    log w_ij), which leaves the ratio unchanged and keeps it finite when every w_ij underflows."""
    out = torch.zeros_like(r)
    for idx, valid, (dr, lw, scratch) in _pair_blocks(r, inv, counts):
        R, S = r[idx], s[idx]  # (Pc, Gc)
        torch.sub(R[:, :, None], R[:, None, :], out=dr)  # (Pc, Gc, Gc): r_i - r_j
        torch.sub(S[:, :, None], S[:, None, :], out=lw)  # s_i - s_j
        lw = _preference_log_weights(lw, tau, buffer=scratch)  # log w_ij
        lw.diagonal(dim1=1, dim2=2).fill_(-math.inf)  # j != i
        if not valid.all():
            lw.masked_fill_(~valid[:, None, :], -math.inf)  # j padding: weight 0
        top = lw.amax(-1, keepdim=True)  # (Pc, Gc, 1), finite: every row has a real j != i (and s / tau is finite)
        w = lw.sub_(top.masked_fill_(top == -math.inf, 0.0)).exp_()  # w_ij / max_j w_ij, 0 off the pairs
        adv = torch.einsum("pij,pij->pi", dr, w) / w.sum(-1)  # (Pc, Gc); padding rows are never read
        out[idx[valid]] = adv[valid]
    return out


# --------------------------------------------------------------------------------------------------------------------
# sequence scores and diagnostics


def sequence_scores(logprobs: Tensor, response_mask: Tensor, length_normalized: bool = True) -> Tensor:
    """The sequence score s_i (B,) from per-token behaviour log-probs ``logprobs`` (B, T) over ``response_mask``
    (B, T): the mean over response tokens (``length_normalized=True``, the project's default) or the sum
    (the sequence's total log-prob). A response with no tokens scores 0. Values outside the mask are ignored."""
    if not isinstance(logprobs, Tensor) or not isinstance(response_mask, Tensor):
        raise TypeError("logprobs and response_mask must be torch.Tensors")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating-point tensor, got {logprobs.dtype}")
    if logprobs.dim() != 2 or response_mask.shape != logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and response_mask {tuple(response_mask.shape)} must "
                         "both be (B, T)")
    mask = response_mask.bool()
    lp = torch.where(mask, logprobs.detach(), 0.0)
    if not torch.isfinite(lp).all():
        raise ValueError("logprobs has NaN or infinite values on response tokens; check the behaviour log-probs")
    total = lp.sum(-1)
    return total / mask.sum(-1).clamp_min(1) if length_normalized else total


def pairwise_weight_stats(rewards: Tensor, group_index: Tensor, seq_logprob: Tensor, temperature: float = 1.0,
                          pair_weight: str = "confidence") -> dict[str, float]:
    """LamPO diagnostics over unordered within-group pairs i < j, for TensorBoard:

    * ``num_pairs``, ``num_unequal_pairs`` (pairs with r_i != r_j, the only ones that carry signal);
    * ``weight_mean``: mean pair weight of the ``pair_weight`` form (see :func:`lampo`) over unequal pairs, 1/2
      meaning the weights are uninformative. ``"confidence"``: mean w_ij (symmetric); small means the policy already
      orders most pairs correctly and confidently. ``"preference"``: w_ij is not symmetric, so each pair reports the
      weight of the better response over the worse, sigmoid((s_better - s_worse) / tau), the policy's preference
      for the better response; large means it already orders most pairs correctly (with the same inputs it is
      1 - the confidence form's mean);
    * ``discordant_frac``: fraction of unequal pairs where the policy scores the worse response higher;
    * ``score_gap_mean``: mean |s_i - s_j| over all pairs.

    Means over an empty set are reported as 0.0 (the counts say when that happens).
    """
    with torch.no_grad():
        r, g, s = _check_inputs(rewards, group_index, seq_logprob, temperature, 0.0, None, pair_weight)
        if s is None:
            raise ValueError("pairwise_weight_stats needs seq_logprob (N,)")
        inv, counts = _dense_groups(g)
        acc = torch.zeros(5, dtype=torch.float64, device=r.device)  # pairs, unequal, sum w, discordant, sum |ds|
        for idx, valid in _padded_groups(inv, counts):
            R, S = r[idx], s[idx]
            dr = R[:, :, None] - R[:, None, :]
            ds = S[:, :, None] - S[:, None, :]
            gc = idx.shape[1]
            upper = torch.ones(gc, gc, dtype=torch.bool, device=r.device).triu(1)
            pair = valid[:, :, None] & valid[:, None, :] & upper  # (Pc, Gc, Gc) each unordered pair once
            unequal = pair & (dr != 0)
            if pair_weight == "preference":  # w_{better, worse}: log w of s_better - s_worse = sign(dr) * ds
                w = _preference_log_weights(torch.sign(dr) * ds, float(temperature)).exp_()
            else:
                w = _pair_weights(dr, ds.clone(), float(temperature))
            acc += torch.stack([
                pair.sum(), unequal.sum(), w[unequal].sum(), (unequal & (torch.sign(dr) * ds < 0)).sum(),
                ds.abs()[pair].sum(),
            ]).to(acc.dtype)
        n, u, sw, disc, sgap = acc.tolist()
    return {
        "num_pairs": n,
        "num_unequal_pairs": u,
        "weight_mean": sw / u if u else 0.0,
        "discordant_frac": disc / u if u else 0.0,
        "score_gap_mean": sgap / n if n else 0.0,
    }


# --------------------------------------------------------------------------------------------------------------------
# DAPO dynamic sampling


def uniform_groups(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Bool (N,): True for rows whose group's rewards are all exactly equal (including groups of one response).

    Such groups give every group-relative estimator a zero advantage, hence no gradient (DAPO's observation).
    Equality is exact; with a dense auxiliary reward the rewards of a group are rarely exactly equal.
    """
    with torch.no_grad():
        r, g, _ = _check_inputs(rewards, group_index, None, 1.0, 0.0, None)
        inv, counts = _dense_groups(g)
        num_groups = counts.numel()
        hi = r.new_full((num_groups,), -math.inf).scatter_reduce(0, inv, r, "amax")
        lo = r.new_full((num_groups,), math.inf).scatter_reduce(0, inv, r, "amin")
        return (hi == lo)[inv]


def drop_uniform_groups(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, dict[str, float]]:
    """DAPO dynamic sampling's filter: ``keep`` (N,) bool, False for rows of all-equal-reward groups, plus counts
    ``groups``, ``groups_dropped``, ``rows_dropped`` and ``frac_groups_dropped`` for logging.

    Departure from DAPO: DAPO keeps sampling until the batch is full of informative groups; here we only filter (the
    caller decides whether to resample). Apply it with ``RolloutBatch.subset(keep)`` and, to the batch's tokens,
    ``TokenBatch.select(keep)``: the same rows in the same order.
    """
    uniform = uniform_groups(rewards, group_index)
    _, inv, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    dropped_groups = int(torch.zeros_like(counts).index_add_(0, inv, uniform.long()).gt(0).sum())
    num_groups = counts.numel()
    stats = {
        "groups": float(num_groups),
        "groups_dropped": float(dropped_groups),
        "rows_dropped": float(uniform.sum()),
        "frac_groups_dropped": dropped_groups / num_groups,
    }
    return ~uniform, stats


__all__ = [
    "ADVANTAGE_ESTIMATORS", "AdvantageFn", "PAIR_WEIGHTS", "grpo", "dr_grpo", "rloo", "lampo", "sequence_scores",
    "pairwise_weight_stats", "uniform_groups", "drop_uniform_groups",
]
