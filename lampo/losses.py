"""Policy losses, loss aggregation, KL penalties and entropy: the token-level RL objective.

:func:`policy_objective` is the one function every training backend (torch, DeepSpeed, Megatron) calls once it has
per-token log-probs, so that their results are comparable. Layout (see :mod:`lampo.record`): per-token tensors are
(B, T) aligned with ``input_ids``; ``response_mask`` (B, T) is 1 on response tokens; advantages are (B,), one per
sequence, broadcast to its tokens. Values outside the mask are never read (padding may hold anything, even NaN).

Gradient accumulation: compute :func:`loss_normalizers` once over the whole (global, all data-parallel ranks) batch
and pass them to ``policy_objective`` for every micro-batch. Then the micro-batch losses (and gradients) sum to the
loss of the whole batch exactly, for every aggregation mode. Metrics, by contrast, always describe the micro-batch
alone (see ``policy_objective``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lampo.record import check_finite
from lampo.registry import Registry

#: log-ratios are clamped to [-_MAX_LOG_RATIO, _MAX_LOG_RATIO] before exp: a numerical guard (e^20 is already far
#: outside any trust region), not part of the objective.
_MAX_LOG_RATIO = 20.0


class PolicyLossFn(Protocol):
    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *,
                 clip_low: float, clip_high: float, dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
KL_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry[Callable[..., Tensor]] = Registry("loss aggregation mode")


# --------------------------------------------------------------------------------------------------------------------
# policy losses


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low={clip_low} must be in [0, 1): the ratio's lower bound is 1 - clip_low")
    if not clip_high >= 0:
        raise ValueError(f"clip_high={clip_high} must be >= 0: the ratio's upper bound is 1 + clip_high")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (e.g. 3.0), or None to disable it")


def _clipped_surrogate(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float,
                       dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic clipped surrogate, per token. ``ratio`` (B, T), ``adv`` (B, 1).

    loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)); with dual clip (Ye et al. 2020), tokens with
    A < 0 are further capped at -A * dual_clip, so a huge ratio on a bad response cannot blow the loss up.
    Returns the loss (B, T) and (B, T) float indicators of where each clip is active (where the gradient is zero).
    """
    unclipped = -adv * ratio
    loss = torch.maximum(unclipped, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    clip_high_on = (adv > 0) & (ratio > 1 + clip_high)
    clip_low_on = (adv < 0) & (ratio < 1 - clip_low)
    dual_on = torch.zeros_like(clip_low_on)
    if dual_clip is not None:
        cap = -adv * dual_clip  # (B, 1), no gradient
        dual_on = (adv < 0) & (loss > cap)
        loss = torch.where(dual_on, cap.expand_as(loss), loss)
    return loss, {"clip_frac_low": clip_low_on.float(), "clip_frac_high": clip_high_on.float(),
                  "dual_clip_frac": dual_on.float()}


def _token_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log(pi_theta / pi_old) per token (B, T), 0 outside the mask, computed in float32 at least."""
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = mask.bool()
    return torch.where(m, logprobs.to(dtype), 0.0) - torch.where(m, old_logprobs.detach().to(dtype), 0.0)


def _ratio_metrics(ratio: Tensor, log_ratio: Tensor) -> dict[str, Tensor]:
    # approx_kl: Schulman's k3 estimate of KL(pi_old || pi_theta) from the behaviour samples, per token
    x = log_ratio.detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return {"ratio": ratio.detach(), "approx_kl": torch.expm1(x) - x}


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *,
             clip_low: float, clip_high: float, dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with a per-token ratio pi_theta(o_t) / pi_old(o_t), asymmetric clip range
    [1 - clip_low, 1 + clip_high] (DAPO's clip-higher when clip_high > clip_low) and optional dual clip.

    ``logprobs`` (B, T) with grad, ``old_logprobs`` (B, T), ``advantages`` (B,), ``response_mask`` (B, T).
    Returns ``per_token_loss`` (B, T) (0 outside the mask) and per-token metric tensors (B, T): ``ratio``,
    ``approx_kl``, ``clip_frac_low``, ``clip_frac_high``, ``dual_clip_frac``. LamPO uses exactly this token-level
    objective with its sequence advantage broadcast to every response token (the project's formulation).
    """
    _check_clip(clip_low, clip_high, dual_clip)
    log_ratio = _token_log_ratio(logprobs, old_logprobs, response_mask)  # (B, T)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    loss, ind = _clipped_surrogate(ratio, advantages.detach().to(ratio.dtype)[:, None], clip_low, clip_high, dual_clip)
    return torch.where(response_mask.bool(), loss, 0.0), {**_ratio_metrics(ratio, log_ratio), **ind}


@POLICY_LOSSES.register("gspo")
def gspo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *,
         clip_low: float, clip_high: float, dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: one importance ratio per sequence, s_i = exp(mean over response tokens of log pi_theta / pi_old),
    clipped like PPO and broadcast to every response token of the sequence. Same signature and outputs as
    :func:`ppo_clip` (``ratio`` is the broadcast sequence ratio; ``approx_kl`` stays per token).

    Every aggregation mode weights the tokens of one sequence equally, so the broadcast gives GSPO's sequence-level
    gradient s_i * A_i * mean_t grad log pi(o_t) times that sequence's total weight; with ``seq-mean-token-mean`` it is
    GSPO exactly. Note GSPO's paper uses far narrower clip ranges (about 3e-4 / 4e-4) than token-level PPO; set
    ``clip_low`` / ``clip_high`` accordingly. Dual clip, when set, applies to the sequence ratio.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    log_ratio = _token_log_ratio(logprobs, old_logprobs, response_mask)  # (B, T)
    n_tokens = response_mask.bool().sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    seq_log_ratio = (log_ratio.sum(-1, keepdim=True) / n_tokens).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B, 1)
    ratio = torch.exp(seq_log_ratio).expand_as(log_ratio)  # (B, T)
    loss, ind = _clipped_surrogate(ratio, advantages.detach().to(ratio.dtype)[:, None], clip_low, clip_high, dual_clip)
    return torch.where(response_mask.bool(), loss, 0.0), {**_ratio_metrics(ratio, log_ratio), **ind}


# --------------------------------------------------------------------------------------------------------------------
# aggregation


def _count(given: float | int | Tensor | None, local: Tensor, name: str) -> Tensor | float:
    if given is None:
        return local.clamp_min(1)
    if isinstance(given, Tensor):
        given = given.detach()
        if given.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(given.shape)}")
        if bool(given < 0):
            raise ValueError(f"{name}={given.item()} must be >= 0")
        return given.clamp_min(1)
    if given < 0:
        raise ValueError(f"{name}={given} must be >= 0")
    return max(given, 1)


@LOSS_AGGREGATIONS.register("token-mean")
def _token_mean(v: Tensor, m: Tensor, num_tokens, num_seqs, max_len) -> Tensor:
    return v.sum() / _count(num_tokens, m.sum(), "num_tokens")


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(v: Tensor, m: Tensor, num_tokens, num_seqs, max_len) -> Tensor:
    per_seq = v.sum(-1) / m.sum(-1).clamp_min(1)  # (B,)
    return per_seq.sum() / _count(num_seqs, m.new_tensor(m.shape[0]), "num_seqs")


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(v: Tensor, m: Tensor, num_tokens, num_seqs, max_len) -> Tensor:
    return v.sum() / _count(num_seqs, m.new_tensor(m.shape[0]), "num_seqs")


@LOSS_AGGREGATIONS.register("seq-sum-constant")
def _seq_sum_constant(v: Tensor, m: Tensor, num_tokens, num_seqs, max_len) -> Tensor:
    seqs = _count(num_seqs, m.new_tensor(m.shape[0]), "num_seqs")
    length = max(v.shape[-1], 1) if max_len is None else _count(max_len, v.new_ones(()), "max_len")
    return v.sum() / (seqs * length)


def aggregate(values: Tensor, mask: Tensor, mode: str, *, num_tokens: float | Tensor | None = None,
              num_seqs: float | Tensor | None = None, max_len: float | Tensor | None = None) -> Tensor:
    """Reduce per-token ``values`` (B, T) over ``mask`` (B, T) to a scalar.

    * ``token-mean``: sum over all response tokens / number of response tokens (DAPO's token-level loss);
    * ``seq-mean-token-mean``: mean over tokens within each sequence, then mean over sequences (GRPO's original form);
    * ``seq-mean-token-sum``: sum over tokens within each sequence, mean over sequences;
    * ``seq-sum-constant``: Dr. GRPO, sum over all tokens / (num_seqs * max_len) with a constant ``max_len``
      (pass the generation budget, e.g. ``rollout.max_new_tokens``; by default the padded width T).

    ``num_tokens`` / ``num_seqs`` / ``max_len``, when given (global counts from :func:`loss_normalizers`), replace the
    local ones, so that summing over micro-batches equals the whole batch. A count of 0 (nothing to train on) gives
    a loss of 0, not NaN. Local counts: response tokens in the batch; sequences B. Every row counts as a sequence
    (locally and in :func:`loss_normalizers`), also one with no response token: it adds 0 to the sum but counts in
    the mean.
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    m = mask.bool()
    v = torch.where(m, values, 0.0)
    return LOSS_AGGREGATIONS[mode](v, m.to(v.dtype), num_tokens, num_seqs, max_len)


def loss_normalizers(response_mask: Tensor, max_len: int | None = None) -> dict[str, int]:
    """Global counts for :func:`aggregate` over a whole batch (B, T), computed once before splitting it into
    micro-batches: ``num_tokens`` (response tokens), ``num_seqs`` (B), ``max_len`` (the given constant, e.g.
    ``rollout.max_new_tokens``, else T). With data parallelism, all-reduce (sum) num_tokens and num_seqs across
    ranks."""
    m = response_mask.bool()
    return {"num_tokens": int(m.sum()), "num_seqs": int(m.shape[0]),
            "max_len": int(max_len if max_len is not None else m.shape[-1])}


# --------------------------------------------------------------------------------------------------------------------
# KL to the reference policy, entropy


@KL_ESTIMATORS.register("k1")
def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


@KL_ESTIMATORS.register("k2")
def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


@KL_ESTIMATORS.register("k3")
def _k3(log_ratio: Tensor) -> Tensor:
    return torch.expm1(-log_ratio) + log_ratio


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate (B, T) of KL(pi || ref) from tokens sampled from pi, with x = log pi(o_t) - log ref(o_t)
    (Schulman, "Approximating KL divergence"):

    * ``k1`` = x: unbiased, high variance, can be negative;
    * ``k2`` = x**2 / 2: biased (low bias when pi ~ ref), low variance, >= 0;
    * ``k3`` = exp(-x) - 1 + x: unbiased, low variance, >= 0 (the default, as in GRPO).

    The tokens actually come from pi_old, not pi_theta, a small off-policy gap common to GRPO implementations.
    ``x`` is clamped to +-20 as a numerical guard. All are 0 when ``logprobs == ref_logprobs``.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    x = (logprobs.to(dtype) - ref_logprobs.detach().to(dtype)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return KL_ESTIMATORS[estimator](x)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (B, T) of the softmax of ``logits`` (B, T, V): H = logsumexp(z) - sum_v softmax(z)_v z_v.

    Never builds log_softmax; without autograd it works in place in one (B, T, V) buffer. Computed in float32 at
    least (bf16 logits are upcast).
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (B, T, 1)
    if torch.is_grad_enabled() and z.requires_grad:
        p = torch.softmax(z, dim=-1)
        return lse.squeeze(-1) - (p * z).sum(-1)
    buf = (z - lse).exp_().mul_(z)  # (B, T, V): p_v * z_v
    return lse.squeeze(-1) - buf.sum(-1)


# --------------------------------------------------------------------------------------------------------------------
# the objective every backend calls


def _check_objective_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                            response_mask: Tensor) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("response_mask", response_mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({logprobs.shape[0]},), one per sequence, "
                         f"got shape {tuple(advantages.shape)}")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating-point tensor, got {logprobs.dtype}")


def policy_objective(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *,
    policy_loss: str = "ppo_clip", clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
    loss_agg: str = "token-mean", kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
    ref_logprobs: Tensor | None = None, entropy: Tensor | None = None, num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None, max_len: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The RL loss of one (micro-)batch: ``loss = agg(policy loss) + kl_coef * agg(KL) - entropy_coef * agg(H)``.

    ``logprobs`` (B, T) under the current policy, with grad; ``old_logprobs`` (B, T) behaviour log-probs;
    ``advantages`` (B,); ``response_mask`` (B, T); ``ref_logprobs`` (B, T), needed only when ``kl_coef > 0`` (if given
    with ``kl_coef == 0`` the KL is still logged); ``entropy`` (B, T) from :func:`entropy_from_logits`, optional
    (logged; needed when ``entropy_coef != 0``). ``policy_loss`` names :data:`POLICY_LOSSES`, ``loss_agg``
    :data:`LOSS_AGGREGATIONS`, ``kl_estimator`` :data:`KL_ESTIMATORS`. ``num_tokens`` / ``num_seqs`` / ``max_len``:
    the global counts of :func:`loss_normalizers` when the batch is split into micro-batches.

    Returns the scalar loss (with global normalisers: this micro-batch's additive share of the batch loss) and float
    metrics of this micro-batch alone, computed with its local counts whatever normalisers are passed: ``loss``,
    ``pg_loss``, ``kl`` (when available), ``entropy`` (when given), each aggregated like the loss;
    ``clip_frac_low``, ``clip_frac_high``, ``dual_clip_frac``, ``approx_kl`` (k3 of KL(pi_old || pi_theta)) and
    ``ratio_mean`` as means over its response tokens; ``ratio_max``. To combine micro-batches, weight each by its
    number of response tokens (exact for the token means and for every metric under ``token-mean``) and take the
    max of ``ratio_max``.

    Raises FloatingPointError when any input holds NaN/inf on response tokens.
    """
    _check_objective_inputs(logprobs, old_logprobs, advantages, response_mask)
    mask = response_mask.bool()
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs)):
        check_finite(name, torch.where(mask, t.detach(), 0.0))
    check_finite("advantages", advantages.detach())
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef} must be >= 0")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logprobs (B, T) from the reference policy")
    if entropy is None and entropy_coef != 0:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy (B, T); compute it with entropy_from_logits")
    for name, t in (("ref_logprobs", ref_logprobs), ("entropy", entropy)):
        if t is not None:
            if t.shape != logprobs.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs {tuple(logprobs.shape)}")
            check_finite(name, torch.where(mask, t.detach(), 0.0))

    per_token, token_metrics = POLICY_LOSSES[policy_loss](
        logprobs, old_logprobs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    terms = {"pg_loss": (per_token, 1.0)}  # name -> (per-token values (B, T), coefficient in the loss)
    if ref_logprobs is not None:
        # padding may hold anything (even inf): mask the inputs, not just the output, so no NaN reaches a gradient
        kl = kl_penalty(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0), kl_estimator)
        terms["kl"] = (kl, kl_coef)
    if entropy is not None:
        terms["entropy"] = (entropy, -entropy_coef)

    def combine(**counts: float | Tensor | None) -> dict[str, Tensor]:
        out = {k: aggregate(v, response_mask, loss_agg, **counts) for k, (v, _) in terms.items()}
        out["loss"] = out["pg_loss"] + sum(c * out[k] for k, (_, c) in terms.items() if k != "pg_loss" and c != 0)
        return out

    parts = combine(num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    loss = parts["loss"]
    if num_tokens is not None or num_seqs is not None:  # metrics describe this micro-batch: its own counts
        with torch.no_grad():
            parts = combine(max_len=max_len)
    scalars = {k: v.detach() for k, v in parts.items()}
    for name in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio"):
        scalars["ratio_mean" if name == "ratio" else name] = aggregate(token_metrics[name], response_mask, "token-mean")
    scalars["ratio_max"] = torch.where(mask, token_metrics["ratio"], 0.0).amax() if mask.any() else loss.new_zeros(())
    names = list(scalars)
    values = torch.stack([scalars[k].to(torch.float64).reshape(()) for k in names]).tolist()  # one device sync
    return loss, dict(zip(names, values))


__all__ = [
    "POLICY_LOSSES", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "PolicyLossFn", "ppo_clip", "gspo", "aggregate",
    "loss_normalizers", "kl_penalty", "entropy_from_logits", "policy_objective",
]
