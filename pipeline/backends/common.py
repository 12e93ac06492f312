"""Pieces every training backend shares: the optimizer and LR schedule (:class:`OptimizerSpec`), log-probs from
logits, the loss of one micro-batch, metric merging, and moving optimizer state between the accelerator and the host
around colocated rollouts. The training step that puts them together is
:class:`~pipeline.backends.base.TrainingBackend`'s."""
from __future__ import annotations

import math
import pickle
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lampo.losses import entropy_from_logits, policy_objective
from lampo.record import TokenBatch
from pipeline.checks import PipelineError

if TYPE_CHECKING:
    from pipeline.config import AlgorithmConfig, BackendConfig


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer and LR schedule of a training run, the same for every backend: AdamW (decoupled weight decay)
    and :func:`warmup_cosine`, stepped once per optimizer step. Built by the stage from its own section (``sft.*`` or
    ``rl.*``: lr, steps, warm-up, floor, weight decay) and ``backend.adam_*`` (:meth:`from_config`)."""
    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def from_config(cls, backend: BackendConfig, *, lr: float, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.1, weight_decay: float = 0.0) -> OptimizerSpec:
        return cls(lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                   weight_decay=weight_decay, betas=(backend.adam_beta1, backend.adam_beta2), eps=backend.adam_eps)

    def adamw_options(self) -> dict[str, Any]:
        """The keyword options of ``torch.optim.AdamW`` (DeepSpeed's ``optimizer.params`` too)."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def adamw(self, params: Iterable[Any], zero_group: Any = None) -> torch.optim.Optimizer:
        """AdamW over ``params``; with a data-parallel ``zero_group`` its state is partitioned over that group
        (ZeRO-1, ``torch.distributed.optim.ZeroRedundancyOptimizer``)."""
        if zero_group is None:
            return torch.optim.AdamW(params, **self.adamw_options())
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=zero_group,
                                       **self.adamw_options())

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The one scheduler factory: :func:`warmup_cosine` as a ``LambdaLR`` on ``optimizer``. DeepSpeed takes the
        bound method itself as ``lr_scheduler``."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
            s, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio))


def hf_logits(model: Any, mb: TokenBatch) -> Tensor:
    """Logits ``(b, T, V)`` of a Hugging Face causal LM (or an engine wrapping one) on micro-batch ``mb``."""
    return model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits


def length_sorted_micro_batches(batch: TokenBatch, micro_batch_size: int) -> list[tuple[Tensor, TokenBatch]]:
    """``batch`` cut into micro-batches of at most ``micro_batch_size`` rows, after sorting the rows by length
    (longest first, ties in row order) when there is more than one, each cut to its own longest sequence: far less
    padding than cutting in row order to the batch's longest. Returns ``(rows, micro_batch)`` pairs, ``rows`` (b,) the
    LongTensor of the micro-batch's row indices in ``batch``. Needs right padding
    (:meth:`lampo.record.TokenBatch.from_sequences`): positions past a row's length are padding, which a causal
    model's outputs at the real positions do not see, so cutting them changes nothing but float rounding. A batch that
    fits one micro-batch keeps its row order (sorting would only move rows, and so the rounding of sums over them)."""
    lengths = batch.attention_mask.sum(dim=1)  # (B,)
    if len(batch) <= micro_batch_size:
        order = torch.arange(len(batch))
    else:
        order = torch.sort(lengths, descending=True, stable=True).indices
    out = []
    for start in range(0, len(batch), micro_batch_size):
        rows = order[start:start + micro_batch_size]
        width = max(int(lengths[rows].max()), 1) if len(rows) else 0
        out.append((rows, trim(batch.select(rows), width)))
    return out


def trim(batch: TokenBatch, width: int) -> TokenBatch:
    """``batch`` with every (B, T) field cut to its first ``width`` positions (advantages (B,) kept)."""
    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[:, :width]

    return TokenBatch(cut(batch.input_ids), cut(batch.attention_mask), cut(batch.response_mask),  # type: ignore[arg-type]
                      cut(batch.old_logprobs), cut(batch.ref_logprobs), batch.advantages)


def token_logprobs_from_logits(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-token log-probs aligned with ``input_ids``.

    ``logits`` (B, T, V) are the model outputs at every position; returns (B, T) where entry t is
    ``log p(input_ids[t] | input_ids[:t])`` (read from the logits at t-1) and entry 0 is 0.
    Uses gather minus logsumexp so no (B, T, V) log-softmax copy is kept.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    target = input_ids[:, 1:].unsqueeze(-1)  # (B, T-1, 1)
    picked = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return torch.nn.functional.pad(picked, (1, 0))


def entropy_aligned(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution, aligned like :func:`token_logprobs_from_logits`: (B, T)."""
    return torch.nn.functional.pad(entropy_from_logits(logits[:, :-1].float()), (1, 0))


def policy_kwargs(algo: AlgorithmConfig, max_len: int) -> dict[str, Any]:
    """The keyword options of :func:`lampo.losses.policy_objective`, read from the config (its one source)."""
    return dict(policy_loss=algo.policy_loss, clip_low=algo.clip_low, clip_high=algo.clip_high,
                dual_clip=algo.dual_clip, loss_agg=algo.loss_agg, kl_coef=algo.kl_coef,
                kl_estimator=algo.kl_estimator, entropy_coef=algo.entropy_coef, max_len=max_len)


def sft_loss(logprobs: Tensor, mb: TokenBatch, num_tokens: Tensor | float) -> Tensor:
    """This micro-batch's share of the batch's masked next-token loss: ``-sum(lp * mask) / num_tokens`` where
    ``logprobs`` (b, T) are aligned per-token log-probs and ``num_tokens`` counts the response tokens of the whole
    (global) batch, so the shares of all micro-batches add up to the batch mean."""
    return -(logprobs * mb.response_mask).sum() / num_tokens  # a non-finite one is the base class's to skip


def rl_loss(logprobs: Tensor, entropy: Tensor | None, mb: TokenBatch, algo: AlgorithmConfig, *, max_len: int,
            num_tokens: float, num_seqs: int) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's share of the policy objective, from aligned per-token ``logprobs`` / ``entropy`` (b, T)
    however the backend computed them (full or vocabulary-parallel logits); global normalisers make the shares add up
    exactly. Entropy is only differentiated when ``entropy_coef`` uses it. Metrics describe the micro-batch alone."""
    if entropy is not None and algo.entropy_coef == 0:
        entropy = entropy.detach()
    loss, metrics = policy_objective(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask,
                                     ref_logprobs=mb.ref_logprobs, entropy=entropy, num_tokens=num_tokens,
                                     num_seqs=num_seqs, **policy_kwargs(algo, max_len=max_len))
    return loss, metrics  # a non-finite loss is the base class's to skip (TrainingBackend.rl_step)


#: the key under which a micro-batch's metrics carry its sequence count, for :func:`merge_metrics`
NUM_SEQS = "num_seqs"
#: the metrics of :func:`lampo.losses.policy_objective` that are aggregated like the loss (``rl.algorithm.loss_agg``);
#: the others are token means or maxima
LOSS_LIKE = frozenset({"loss", "pg_loss", "kl", "entropy"})


def merge_metrics(parts: list[tuple[float, dict[str, float]]], loss_agg: str = "token-mean") -> dict[str, float]:
    """Combine micro-batch metrics into the whole batch's, exactly whatever the split: ``*_max`` keys take the max,
    ``*_min`` the min; token means are weighted by each micro-batch's response tokens (the ``float`` of each part);
    the loss-like metrics (:data:`LOSS_LIKE`) under a ``seq-*`` ``loss_agg`` are means over sequences, so they are
    weighted by each micro-batch's sequence count (its metrics' :data:`NUM_SEQS` entry, dropped from the result)."""
    out: dict[str, float] = {}
    total = sum(w for w, _ in parts) or 1.0
    seqs = [m.get(NUM_SEQS) for _, m in parts]
    by_seqs = loss_agg != "token-mean" and all(n is not None for n in seqs)
    total_seqs = sum(seqs) if by_seqs else 0.0  # type: ignore[arg-type]
    for (w, m), n in zip(parts, seqs):
        for k, v in m.items():
            if k == NUM_SEQS:
                continue
            if k.endswith("_max"):
                out[k] = max(out.get(k, -math.inf), v)
            elif k.endswith("_min"):
                out[k] = min(out.get(k, math.inf), v)
            elif by_seqs and k in LOSS_LIKE:
                out[k] = out.get(k, 0.0) + v * n / (total_seqs or 1.0)
            else:
                out[k] = out.get(k, 0.0) + v * w / total
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data that :func:`load_checkpoint_file` (``weights_only=True``) reads back:
    Python's ``random`` state as its version, its 625 words (an int64 tensor) and its cached Gaussian, torch's (and
    CUDA's) as byte tensors. Nothing here draws from numpy's global RNG, so its state is not saved."""
    version, words, gauss_next = random.getstate()
    state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (also the ``random.getstate()`` tuple that older checkpoints hold)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"])
    random.setstate(tuple(py) if isinstance(py, list) else py)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint_file(path: str | Path, map_location: Any = None) -> Any:
    """Read a checkpoint file of ours with ``torch.load(..., weights_only=True)``: tensors and plain containers
    (dicts, lists, tuples, numbers, strings) only. Our backends write nothing else, so a file that needs any other
    Python object to unpickle - which could run code while loading - was not written by them: it is refused with a
    :class:`~pipeline.checks.PipelineError` naming the file and the object, and nothing in it is executed."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the object ("... GLOBAL posix.system ..."); its advice to allowlist it is not repeated here
        what = [line.strip().removeprefix("WeightsUnpickler error: ").split(". Please")[0]
                for line in str(e).splitlines() if "GLOBAL" in line]
        raise PipelineError(
            f"refusing to load checkpoint file {path}: it holds a pickled Python object that is not plain data "
            f"({what[0] if what else str(e).splitlines()[0]}), and unpickling it could run arbitrary code. LamPO's "
            "checkpoints hold only tensors and plain containers, so this file was written by something else or was "
            "tampered with; delete this checkpoint folder (the stage then resumes from an earlier one) or restore it "
            "from a trusted copy") from None


def inner_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The optimizer that really holds the per-parameter state behind a wrapper.

    ``torch.distributed.optim.ZeroRedundancyOptimizer`` steps a local optimizer over this rank's partition and keeps
    the moments in ``opt.optim.state``; its own ``opt.state`` is left empty by ``step`` and, after
    ``load_state_dict``, maps every parameter owned by another rank to ``None`` (``zero_redundancy_optimizer.py``,
    ``load_state_dict``). DeepSpeed's ZeRO and BF16 optimizers keep the torch optimizer they step as ``opt.optimizer``.
    """
    while True:
        inner = getattr(opt, "optim", None)
        if inner is None:
            inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is opt:
            return opt
        opt = inner


def move_optimizer_state(opt: Any, device: torch.device | str) -> int:
    """Move the tensors of the optimizer state that really holds them (:func:`inner_optimizer`) to ``device``.

    Entries that are ``None`` or not dicts, and values that are not tensors, are left alone; so is ``step``, a
    scalar counter that AdamW keeps on the host unless it is ``capturable``/``fused``. Copies are blocking, so the
    source memory is free to reuse on return. Returns the bytes of state handed to ``device``.
    """
    moved = 0
    device = torch.device(device)
    for state in inner_optimizer(opt).state.values():
        if not isinstance(state, dict):
            continue
        for k, v in state.items():
            if k == "step" or not isinstance(v, Tensor):
                continue
            state[k] = v.to(device)
            moved += v.numel() * v.element_size()
    return moved
