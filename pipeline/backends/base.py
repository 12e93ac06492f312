"""The training-backend interface: every backend (torch, DeepSpeed, Megatron) implements exactly this.

The RL objective itself is not the backend's business: a backend turns a :class:`~lampo.record.TokenBatch` into
per-token log-probs (and entropies) with its own model layout, then hands them to
:func:`lampo.losses.policy_objective`, the same function for every backend. That is what makes the parity tests
between backends meaningful.

World size 1 and parallel degree 1 go through the same code as the distributed case.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from lampo.record import TokenBatch

if TYPE_CHECKING:
    from pipeline.config import Config


class TrainingBackend(ABC):
    """A model plus its optimizer, trained by whole optimizer steps.

    Construction: ``Backend(cfg, model_path, lr=..., total_steps=..., warmup_steps=..., reference=False)`` loads the
    Hugging Face checkpoint at ``model_path`` (a folder with config.json and safetensors), builds the optimizer and LR
    schedule (AdamW, linear warm-up then cosine decay to ``min_lr_ratio``), and, when ``reference`` is True, keeps a
    frozen copy of the initial weights for KL (only built when ``rl.algorithm.kl_coef > 0``).
    """

    #: rank 0 of the data-parallel/model-parallel world writes files and logs
    is_main: bool = True

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Refuse a config this backend cannot run (e.g. heads not divisible by TP), naming the numbers."""

    @abstractmethod
    def token_logprobs(self, batch: TokenBatch, *, reference: bool = False) -> Tensor:
        """Per-token log-probs ``(B, T)`` of ``batch.input_ids`` under the current (or reference) policy, no grad.

        Entry ``t`` is ``log p(input_ids[t] | input_ids[:t])``, entry 0 is 0; padding positions are 0.
        """

    @abstractmethod
    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        """One optimizer step of masked next-token cross-entropy on ``response_mask`` positions, averaged over all
        response tokens of ``batch`` (split into micro-batches internally). Returns ``loss``, ``grad_norm``, ``lr``."""

    @abstractmethod
    def rl_step(self, batch: TokenBatch) -> dict[str, float]:
        """One optimizer step of the policy objective on ``batch`` (which carries ``old_logprobs``, ``advantages`` and,
        with KL, ``ref_logprobs``), split into micro-batches internally with global normalisers so that the result does
        not depend on the micro-batch size. Returns the metrics of ``lampo.losses.policy_objective`` plus ``grad_norm``
        and ``lr``."""

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

    def release_memory(self) -> None:  # noqa: B027 - optional hook
        """Free accelerator memory before a colocated rollout (no-op on CPU): move optimizer state (and other
        training-only state) to the host. The model weights stay where they train: the RL loop syncs them to the rollout
        engine with :meth:`named_full_tensors` between this call and :meth:`reacquire_memory`."""

    def reacquire_memory(self) -> None:  # noqa: B027 - optional hook
        """Undo :meth:`release_memory` before training."""
