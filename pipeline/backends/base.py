"""The training-backend interface: every backend (torch, DeepSpeed, Megatron) implements exactly this.

The RL objective itself is not the backend's business: a backend turns a :class:`~lampo.record.TokenBatch` into
per-token log-probs (and entropies) with its own model layout, then hands them to
:func:`lampo.losses.policy_objective`, the same function for every backend. That is what makes the parity tests
between backends meaningful.

The optimizer step itself is written once, here: :meth:`TrainingBackend.sft_step` and :meth:`TrainingBackend.rl_step`
check the batch, compute the global normalisers (:func:`lampo.losses.loss_normalizers`), build the loss of one
micro-batch (:func:`~.common.sft_loss`, :func:`~.common.rl_loss`), and merge the micro-batches' metrics. A backend
supplies only what depends on its layout:

* :meth:`TrainingBackend._per_token`: aligned log-probs (and entropy) of a micro-batch from its model's output (the
  default reads full-vocabulary Hugging Face logits; Megatron overrides it for vocabulary-parallel logits);
* :meth:`TrainingBackend._forward_backward`: forward and backward of its share of the batch's micro-batches with the
  loss function it is handed, returning one :class:`MicroStep` per micro-batch of the whole batch;
* :meth:`TrainingBackend._optimizer_step`: reduce and clip the gradients, step the optimizer and the LR schedule,
  return ``grad_norm`` and ``lr``; on a non-finite gradient norm apply no update (no optimizer or LR-schedule step),
  clear the gradients and return :meth:`TrainingBackend._skipped` (backends that own a torch optimizer use
  :meth:`TrainingBackend._apply_update`, which does all of this).

Non-finite steps, the same for every backend: a micro-batch whose loss, or whose inputs to it on response tokens
(log-probs and entropy from the model, old and reference log-probs, advantages), hold NaN or infinity gets a NaN loss
(:func:`_poisoned`), whose gradient is NaN, so the backend's own gradient check skips the step (DeepSpeed's ZeRO
overflow check included; there is no fp16 loss scaling in any backend, so every skip is a real fault). The step
reports ``skipped_updates`` (1 or 0); :meth:`TrainingBackend._count_step` counts skips in a row and raises
:class:`NonFiniteSteps` at ``run.max_nonfinite_in_a_row``; the stages log each skip and name the step and the
checkpoint to resume from.

No host round-trip inside the micro-batch loop: the non-finite test and the poisoning are tensor operations
(:func:`_bad_on`, :func:`_poisoned`), and each :class:`MicroStep` may carry its token count and loss as 0-d tensors,
read together once after the loop (the metrics of :func:`lampo.losses.policy_objective` still cost it one read per
micro-batch, and its input checks a few more: that is the library's, shared by every backend).

Old log-probs from the step's own forward (:meth:`TrainingBackend.rl_step_on_policy`): when an RL iteration takes a
single optimizer step (one PPO epoch, one mini-batch), the policy that sampled the responses is the one being
trained, so the old log-probs are the training forward's own, detached, and the ratio is exactly 1: no separate
no-grad forward. A backend that can keep every micro-batch's graph until the losses are built says so
(:meth:`TrainingBackend.fuses_old_logprobs`) and supplies :meth:`TrainingBackend._forward_keep` and
:meth:`TrainingBackend._backward_kept`.

World size 1 and parallel degree 1 go through the same code as the distributed case.
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from lampo.losses import loss_normalizers
from lampo.record import TokenBatch
from pipeline.backends.common import (
    NUM_SEQS,
    OptimizerSpec,
    entropy_aligned,
    merge_metrics,
    rl_loss,
    sft_loss,
    token_logprobs_from_logits,
)

if TYPE_CHECKING:
    from pipeline.config import AlgorithmConfig, BackendConfig, Config


class NonFiniteSteps(FloatingPointError):
    """``run.max_nonfinite_in_a_row`` optimizer steps in a row had a non-finite loss or gradient (none was applied)."""


def _bad_on(mask: Tensor, *tensors: Tensor | None) -> Tensor:
    """A 0-d bool tensor: whether any of ``tensors`` ((b, T), or (b,) per row) holds NaN/inf on a response token
    (padding may hold anything). No host sync."""
    padding = ~mask.bool()
    bad = torch.zeros((), dtype=torch.bool, device=mask.device)
    for t in tensors:
        if t is not None:
            ok = torch.isfinite(t)
            if t.dim() == 2:
                ok = ok | padding
            bad = bad | ~ok.all()
    return bad


def _zeroed(t: Tensor | None) -> Tensor | None:
    """``t`` with NaN and infinities replaced by 0 (so that the loss can be built; it is then poisoned)."""
    return None if t is None else torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _poisoned(loss: Tensor, bad: Tensor | bool = False) -> Tensor:
    """``loss``, or ``loss * NaN`` when it or its inputs (``bad``) are not finite: then its gradient is NaN wherever
    it reaches, so the gradient-norm check of every backend skips the step, even where the loss alone is infinite with
    a finite gradient (``loss + inf``). No host sync: ``loss`` times 1 or NaN, chosen on the device."""
    poison = torch.as_tensor(bad, device=loss.device) | ~torch.isfinite(loss.detach())
    return loss * torch.where(poison, math.nan, 1.0).to(loss.dtype)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the RL loss needs beyond the batch: the algorithm (``rl.algorithm``: policy loss, clipping, KL, loss
    aggregation) and the response-length constant of the loss normalisers (``rollout.max_new_tokens``; None: the
    batch's padded length). SFT needs neither."""
    algorithm: AlgorithmConfig
    max_len: int | None = None


class MicroStep(NamedTuple):
    """What the forward-backward of one micro-batch reports: its response-token count (the weight of its metrics),
    its loss (an additive share of the batch loss: global normalisers) and its metrics (None for SFT). The count and
    the loss may be 0-d tensors (no host sync per micro-batch): :func:`_to_floats` reads them all at once."""
    tokens: float | Tensor
    loss: float | Tensor
    metrics: dict[str, float] | None


def _to_floats(parts: list[MicroStep]) -> list[MicroStep]:
    """``parts`` with every token count and loss a Python float, read from the device in one transfer."""
    if not parts:
        return []
    flat = [v.detach() if isinstance(v, Tensor) else v for p in parts for v in (p.tokens, p.loss)]
    device = next((v.device for v in flat if isinstance(v, Tensor)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in flat]).tolist()
    return [MicroStep(values[2 * i], values[2 * i + 1], p.metrics) for i, p in enumerate(parts)]


# a micro-batch's loss (with grad) and metrics (None for SFT) from the model's output on it (the last pipeline stage's
# logits), and the micro-batch itself (on the training device)
LossFn = Callable[[Tensor, TokenBatch], tuple[Tensor, "dict[str, float] | None"]]


class TrainingBackend(ABC):
    """A model plus its optimizer, trained by whole optimizer steps.

    Construction: ``Backend(model_path, backend=..., model=..., optimizer=..., objective=..., seed=..., colocate=...,
    max_nonfinite=..., max_batch=..., reference=False)`` loads the Hugging Face checkpoint at ``model_path`` (a folder
    with config.json and safetensors) as ``model`` (:class:`~pipeline.config.ModelConfig`) says, lays it out and trains
    it as ``backend`` (:class:`~pipeline.config.BackendConfig`) says, builds the optimizer and LR schedule from
    ``optimizer`` (:class:`~.common.OptimizerSpec`: AdamW, linear warm-up then cosine decay to ``min_lr_ratio``), and,
    when ``reference`` is True, keeps a frozen copy of the initial weights for KL (only built when
    ``rl.algorithm.kl_coef > 0``). ``objective`` (:class:`Objective`) is what :meth:`rl_step` optimises (None: SFT
    only); ``seed`` seeds weight initialisation where a backend needs it; ``colocate`` says that rollouts share the
    accelerator (:meth:`release_memory`); ``max_nonfinite`` is the number of skipped steps in a row that raises
    :class:`NonFiniteSteps`; ``max_batch`` is the largest batch of one optimizer step (DeepSpeed sizes buffers by it).
    A backend sees only these, never the whole :class:`~pipeline.config.Config`: :meth:`from_config` builds them from
    one, for a stage's optimizer settings.
    """

    #: rank 0 of the data-parallel/model-parallel world writes files and logs
    is_main: bool = True
    #: the ``backend.*`` section: layout, micro-batch size, clipping, precision
    options: BackendConfig
    #: what rl_step optimises (None: SFT only)
    objective: Objective | None = None
    #: whether rollouts share the accelerator, and the skipped steps in a row that raise NonFiniteSteps
    colocate: bool = False
    max_nonfinite: int = 3
    #: optimizer steps applied so far
    step: int = 0
    #: non-finite steps skipped in a row just now, and in all (since this backend was built)
    nonfinite_in_a_row: int = 0
    skipped_updates: int = 0
    #: the frozen KL reference model, or None
    reference: Any = None
    #: the torch optimizer and LR schedule, for backends that step them through :meth:`_apply_update`
    optimizer: Any = None
    scheduler: Any = None

    def __init__(self, *, backend: BackendConfig, objective: Objective | None, colocate: bool,
                 max_nonfinite: int) -> None:
        """What every backend keeps of its construction options (a backend's own ``__init__`` calls this first)."""
        self.options, self.objective = backend, objective
        self.colocate, self.max_nonfinite = colocate, max_nonfinite

    @classmethod
    def from_config(cls, cfg: Config, model_path: str | Path, *, lr: float, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.1, weight_decay: float = 0.0, reference: bool = False) -> Any:
        """A backend from a whole ``cfg``, with the optimizer settings of the stage that trains it (``sft.*`` or
        ``rl.*``; ``backend.adam_*`` from ``cfg``): the one place that reads a Config for a backend, so that the
        stages, benchmarks and tests stay one-liners and the backends themselves see only their own options."""
        optimizer = OptimizerSpec.from_config(cfg.backend, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                              min_lr_ratio=min_lr_ratio, weight_decay=weight_decay)
        return cls(model_path, backend=cfg.backend, model=cfg.model, optimizer=optimizer,
                   objective=Objective(cfg.rl.algorithm, max_len=cfg.rollout.max_new_tokens), seed=cfg.run.seed,
                   colocate=cfg.rollout.colocate, max_nonfinite=cfg.run.max_nonfinite_in_a_row,
                   max_batch=max(cfg.sft.batch_size, cfg.rl.mini_batch_size), reference=reference)

    @classmethod  # noqa: B027 - an optional hook: by default a backend accepts every config
    def validate_config(cls, cfg: Config) -> None:
        """Refuse a config this backend cannot run (e.g. heads not divisible by TP), naming the numbers."""

    @abstractmethod
    def token_logprobs(self, batch: TokenBatch, *, reference: bool = False) -> Tensor:
        """Per-token log-probs ``(B, T)`` of ``batch.input_ids`` under the current (or reference) policy, no grad.

        Entry ``t`` is ``log p(input_ids[t] | input_ids[:t])``, entry 0 is 0; padding positions are 0.
        """

    # --- the training step, shared by every backend -----------------------------------------------------------------
    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        """One optimizer step of masked next-token cross-entropy on ``response_mask`` positions, averaged over all
        response tokens of ``batch`` (split into micro-batches internally). Returns ``loss``, ``grad_norm``, ``lr``."""
        num_tokens = self._normalizers(batch)["num_tokens"]

        def loss_fn(output: Tensor, mb: TokenBatch) -> tuple[Tensor, None]:
            lp, _ = self._per_token(output, mb, entropy=False)
            return _poisoned(sft_loss(lp, mb, num_tokens)), None

        parts = _to_floats(self._forward_backward(batch, loss_fn))
        loss = sum(p.loss for p in parts)
        return {"loss": loss, **self._count_step(loss, self._optimizer_step())}

    def rl_step(self, batch: TokenBatch) -> dict[str, float]:
        """One optimizer step of the policy objective on ``batch`` (which carries ``old_logprobs``, ``advantages`` and,
        with KL, ``ref_logprobs``), split into micro-batches internally with global normalisers so that the result does
        not depend on the micro-batch size. Returns the metrics of ``lampo.losses.policy_objective`` plus ``grad_norm``
        and ``lr``."""
        if batch.old_logprobs is None or batch.advantages is None:
            raise ValueError("rl_step needs a batch with old_logprobs and advantages")
        norm, algo = self._normalizers(batch), self._objective().algorithm

        def loss_fn(output: Tensor, mb: TokenBatch) -> tuple[Tensor, dict[str, float]]:
            lp, ent = self._per_token(output, mb, entropy=True)
            return self._rl_loss(lp, ent, mb, algo, norm)

        return self._finish_rl_step(self._forward_backward(batch, loss_fn))

    def rl_step_on_policy(self, batch: TokenBatch, advantages_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """One optimizer step of the policy objective whose behaviour policy is the current one (an RL iteration with a
        single optimizer step): the old log-probs are the training forward's own, detached (ratio exactly 1), so no
        separate no-grad forward is run. Gives the update :meth:`rl_step` gives with ``old_logprobs`` from
        :meth:`token_logprobs` (up to float rounding).

        ``batch`` carries no ``old_logprobs`` or ``advantages`` (``ref_logprobs`` with KL). Every micro-batch is
        forwarded with grad and its graph kept; then ``advantages_fn(old_logprobs)`` gets the detached log-probs of
        the whole batch ((B, T), on the host, padding 0, the layout of :meth:`token_logprobs`) and returns the
        advantages (B,): LamPO's sequence scores need every response of a group before any loss. Then each
        micro-batch's loss is built and back-propagated. Memory: the activations of the whole step at once, not of one
        micro-batch, which is why :meth:`fuses_old_logprobs` decides when this is used. Returns what :meth:`rl_step`
        returns. Non-finite log-probs from the forward skip the step like any other non-finite input (``advantages_fn``
        must not raise on them: :func:`lampo.advantages.sequence_scores` does, so give it finite stand-ins)."""
        if batch.old_logprobs is not None or batch.advantages is not None:
            raise ValueError("rl_step_on_policy computes old_logprobs and advantages itself; the batch carries "
                             "them already: use rl_step")
        norm, algo = self._normalizers(batch), self._objective().algorithm
        kept = self._forward_keep(batch, lambda out, mb: self._per_token(out, mb, entropy=True))
        old = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # (B, T)
        for rows, mb, (lp, _) in kept:
            old[rows, :lp.shape[1]] = (lp.detach() * mb.attention_mask).float().cpu()
        adv = advantages_fn(old)  # (B,)
        if adv.shape != (len(batch),):
            raise ValueError(f"advantages_fn returned shape {tuple(adv.shape)}; expected ({len(batch)},)")
        losses, parts = [], []
        for rows, mb, (lp, ent) in kept:
            mb = dataclasses.replace(mb, old_logprobs=lp.detach(), advantages=adv[rows].to(lp.device))
            loss, metrics = self._rl_loss(lp, ent, mb, algo, norm)
            losses.append(loss)
            parts.append(MicroStep(mb.response_mask.sum(), loss.detach(), metrics))
        self._backward_kept(losses)
        return self._finish_rl_step(parts)

    def fuses_old_logprobs(self, num_sequences: int) -> bool:
        """Whether an RL optimizer step of ``num_sequences`` that is the iteration's only one should take its old
        log-probs from its own forward (:meth:`rl_step_on_policy`) rather than a separate no-grad forward. Backends
        that cannot keep the micro-batches' graphs (the default) say no; see the torch backend for the setting."""
        return False

    def _rl_loss(self, lp: Tensor, ent: Tensor | None, mb: TokenBatch, algo: Any,
                 norm: dict[str, int]) -> tuple[Tensor, dict[str, float]]:
        """One micro-batch's poisoned RL loss and metrics (:func:`~.common.rl_loss`). lampo refuses non-finite
        inputs, so the loss is built from inputs with NaN/inf replaced by 0 (the identity on finite ones, whatever
        their value) and then poisoned when any was not finite: no host sync to decide which."""
        bad = _bad_on(mb.response_mask, lp, ent, mb.old_logprobs, mb.ref_logprobs, mb.advantages)
        mb = dataclasses.replace(mb, old_logprobs=_zeroed(mb.old_logprobs), ref_logprobs=_zeroed(mb.ref_logprobs),
                                 advantages=_zeroed(mb.advantages))
        loss, metrics = rl_loss(_zeroed(lp), _zeroed(ent), mb, algo, **norm)  # metrics: the micro-batch alone
        return _poisoned(loss, bad), {**metrics, NUM_SEQS: float(len(mb))}

    def _finish_rl_step(self, parts: list[MicroStep]) -> dict[str, float]:
        """The optimizer step after the micro-batches' backward, and the step's metrics: the loss is the exact sum of
        the micro-batch shares, the other metrics are merged exactly (:func:`~.common.merge_metrics`), so they do not
        depend on how the batch was split either."""
        parts = _to_floats(parts)
        loss = sum(p.loss for p in parts)
        stats = self._count_step(loss, self._optimizer_step())
        merged = merge_metrics([(p.tokens, p.metrics) for p in parts], self._objective().algorithm.loss_agg)
        return {**merged, "loss": loss, **stats}

    def _objective(self) -> Objective:
        if self.objective is None:
            raise ValueError(f"this {type(self).__name__} was built without an objective (SFT only): rl_step needs one")
        return self.objective

    def _normalizers(self, batch: TokenBatch) -> dict[str, int]:
        """The global normalisers of the whole ``batch`` (:func:`lampo.losses.loss_normalizers`: response tokens, at
        least 1; sequences; ``rollout.max_new_tokens``), so that every micro-batch's loss is its additive share of the
        batch loss whatever the micro-batch size. Refuses an empty batch."""
        if len(batch) == 0:
            raise ValueError("an optimizer step needs a non-empty batch")
        norm = loss_normalizers(batch.response_mask, max_len=None if self.objective is None else self.objective.max_len)
        norm["num_tokens"] = max(norm["num_tokens"], 1)
        return norm

    # --- what a backend supplies to the step --------------------------------------------------------------------------
    def _per_token(self, output: Tensor, mb: TokenBatch, *, entropy: bool) -> tuple[Tensor, Tensor | None]:
        """Aligned per-token log-probs ``(b, T)`` of ``mb`` (and, when ``entropy``, the entropy ``(b, T)``) from the
        model's ``output`` on it. The default reads full-vocabulary logits ``(b, T, V)``."""
        return token_logprobs_from_logits(output, mb.input_ids), entropy_aligned(output) if entropy else None

    @abstractmethod
    def _forward_backward(self, batch: TokenBatch, loss_fn: LossFn) -> list[MicroStep]:
        """Forward and backward of this rank's micro-batches of the global ``batch`` (cut by
        ``backend.micro_batch_size``), each through ``loss_fn(output, micro_batch)``, gradients accumulated for one
        optimizer step. Returns one :class:`MicroStep` for every micro-batch of the whole batch, in micro-batch order,
        the same on every rank."""

    def _forward_keep(self, batch: TokenBatch, per_token: Callable[[Tensor, TokenBatch], Any]
                      ) -> list[tuple[Tensor, TokenBatch, Any]]:
        """Forward every micro-batch of ``batch`` with grad and keep what ``per_token(output, micro_batch)`` returns
        (its graph with it), for :meth:`rl_step_on_policy`: one ``(rows, micro_batch, per_token result)`` per
        micro-batch, ``rows`` the indices of its rows in ``batch`` (a LongTensor; the micro-batch may be cut to its
        longest sequence). Only for backends whose :meth:`fuses_old_logprobs` can say yes."""
        raise NotImplementedError(f"{type(self).__name__} does not keep micro-batch graphs (fuses_old_logprobs)")

    def _backward_kept(self, losses: list[Tensor]) -> None:
        """Back-propagate the losses of :meth:`_forward_keep`'s micro-batches, gradients accumulated for one step."""
        raise NotImplementedError(f"{type(self).__name__} does not keep micro-batch graphs (fuses_old_logprobs)")

    @abstractmethod
    def _optimizer_step(self) -> dict[str, float]:
        """Reduce and clip the accumulated gradients, apply one optimizer and LR-schedule step, clear the gradients,
        count the step; returns ``grad_norm`` and ``lr`` (the LR the step used). A non-finite gradient norm applies
        no update (no optimizer or LR-schedule step, :attr:`step` unchanged), clears the gradients and returns
        :meth:`_skipped`."""

    # --- non-finite steps ---------------------------------------------------------------------------------------------
    @staticmethod
    def _skipped(grad_norm: Any, lr: float) -> dict[str, Any]:
        """What :meth:`_optimizer_step` returns for a step it did not apply (its gradient norm is not finite)."""
        return {"grad_norm": math.nan if grad_norm is None else float(grad_norm), "lr": lr, "skipped": True}

    def _count_step(self, loss: float, stats: dict[str, Any]) -> dict[str, float]:
        """Count a skipped step (``stats["skipped"]``) or reset the count after an applied one; raise
        :class:`NonFiniteSteps` at ``run.max_nonfinite_in_a_row`` skips in a row. Returns the step's metrics with
        ``skipped_updates`` (1.0 or 0.0)."""
        skipped = bool(stats.pop("skipped", False))
        if not skipped:
            self.nonfinite_in_a_row = 0
            return {**stats, "skipped_updates": 0.0}
        self.nonfinite_in_a_row += 1
        self.skipped_updates += 1
        limit = self.max_nonfinite
        if self.nonfinite_in_a_row >= limit:
            n = self.nonfinite_in_a_row
            raise NonFiniteSteps(
                f"{n} optimizer step{'s' if n > 1 else ''} in a row had a non-finite loss or gradient (the last: loss "
                f"{loss}, gradient norm {stats['grad_norm']}; run.max_nonfinite_in_a_row={limit}); no update was "
                f"applied for {'any of them' if n > 1 else 'it'}")
        return {**stats, "skipped_updates": 1.0}

    # --- helpers for the backends -------------------------------------------------------------------------------------

    def _apply_update(self, grad_norm: Tensor, zero_grad: Callable[[], None],
                      after_update: Callable[[], None] | None = None) -> dict[str, float]:
        """The step of a backend that owns ``self.optimizer`` and ``self.scheduler`` (a torch optimizer and
        :meth:`.common.OptimizerSpec.schedule`), once its gradients are reduced and clipped to ``grad_norm``: refuse a
        non-finite norm, step the optimizer and the schedule, run ``after_update`` (e.g. copy fp32 masters into the
        model), clear the gradients with ``zero_grad``; with a non-finite norm, only clear them and return
        :meth:`_skipped`."""
        lr = self.scheduler.get_last_lr()[0]
        if not torch.isfinite(grad_norm):
            zero_grad()
            return self._skipped(grad_norm.item(), lr)
        self.optimizer.step()
        self.scheduler.step()
        if after_update is not None:
            after_update()
        zero_grad()
        self.step += 1
        return {"grad_norm": float(grad_norm), "lr": lr, "skipped": False}

    def _scoring_model(self, policy: Any, reference: bool) -> Any:
        """The model :meth:`token_logprobs` runs: ``policy``, or the frozen reference."""
        if not reference:
            return policy
        if self.reference is None:
            raise RuntimeError("no reference model: it is built only when rl.algorithm.kl_coef > 0")
        return self.reference

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write everything needed to resume (weights, optimizer, scheduler, RNG) into folder ``path``."""

    @abstractmethod
    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote."""

    @abstractmethod
    def export_hf(self, path: str | Path) -> None:
        """Write the current weights as a Hugging Face checkpoint (config.json + model.safetensors) on the main rank."""

    @abstractmethod
    def named_full_tensors(self, ranks: Sequence[int] = (0,)) -> Iterator[tuple[str, Tensor]]:
        """Stream the full (unsharded) weights under Hugging Face names, for in-memory weight sync to the rollout
        engines, to each global rank in ``ranks`` (the engines' leaders). Every rank must iterate (gathers are
        collective); a rank not in ``ranks`` may receive nothing."""

    # --- colocated rollouts -------------------------------------------------------------------------------------------
    def local_module(self) -> torch.nn.Module | None:
        """The whole Hugging Face model, unsharded, in this process, for a rollout engine in the same process to sample
        from without a copy (:meth:`~evaluation.engine.RolloutEngine.can_share`); None when the model is sharded
        across processes or wrapped (DeepSpeed, Megatron)."""
        return None

    def release_memory(self) -> None:
        """Free accelerator memory before a colocated rollout (no-op on CPU): move optimizer state (and other
        training-only state) to the host. The model weights stay where they train: the RL loop syncs them to the rollout
        engine with :meth:`named_full_tensors` between this call and :meth:`reacquire_memory`."""
        if not self._offloads():
            return
        self._move_training_state(to_host=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def reacquire_memory(self) -> None:
        """Undo :meth:`release_memory` before training."""
        if self._offloads():
            self._move_training_state(to_host=False)

    def _offloads(self) -> bool:
        """Whether :meth:`release_memory` moves anything (on an accelerator with ``rollout.colocate``); a
        backend that can move its training state says so here and moves it in :meth:`_move_training_state`."""
        return False

    def _move_training_state(self, *, to_host: bool) -> None:  # noqa: B027 - only called when _offloads()
        """Move the training-only state (optimizer state, fp32 masters, ...) to the host or back to the
        accelerator."""
