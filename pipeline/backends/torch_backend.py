"""Single-process PyTorch training backend: a Hugging Face causal LM, AdamW, warm-up + cosine LR.

The reference implementation that the DeepSpeed and Megatron backends are tested against. It does not split training
across processes: launched by torchrun (for rollouts on every rank, :mod:`pipeline.rollout.groups`), every rank
trains a replica on the whole batch, so the weights stay identical on every rank without communication, and the main
rank alone writes checkpoints. The ``deepspeed`` and ``megatron`` backends split training over the ranks.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lampo.record import TokenBatch
from pipeline import dist
from pipeline.backends.base import LossFn, MicroStep, TrainingBackend
from pipeline.backends.common import (
    OptimizerSpec,
    hf_logits,
    length_sorted_micro_batches,
    load_checkpoint_file,
    rng_state,
    set_rng_state,
    token_logprobs_from_logits,
)
from pipeline.models import load_hf_model

if TYPE_CHECKING:
    from pipeline.backends.base import Objective
    from pipeline.config import BackendConfig, ModelConfig


class TorchBackend(TrainingBackend):
    def __init__(self, model_path: str | Path, *, backend: BackendConfig, model: ModelConfig,
                 optimizer: OptimizerSpec, objective: Objective | None = None, seed: int = 0, colocate: bool = False,
                 max_nonfinite: int = 3, max_batch: int = 1, reference: bool = False):
        super().__init__(backend=backend, objective=objective, colocate=colocate, max_nonfinite=max_nonfinite)
        self.is_main = dist.is_main()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_hf_model(model_path, model, self.device)
        self.model.train()
        self.reference = None
        if reference:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = optimizer.adamw(self.model.parameters())
        self.scheduler = optimizer.schedule(self.optimizer)
        self.step = 0

    @torch.no_grad()
    def token_logprobs(self, batch: TokenBatch, *, reference: bool = False) -> Tensor:
        model = self._scoring_model(self.model, reference)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # (B, T)
        for rows, mb in self._micro_batches(batch):
            mb = mb.to(self.device)
            lp = token_logprobs_from_logits(hf_logits(model, mb), mb.input_ids)
            out[rows, :lp.shape[1]] = (lp * mb.attention_mask).float().cpu()
        return out

    def _micro_batches(self, batch: TokenBatch) -> list[tuple[Tensor, TokenBatch]]:
        """Micro-batches of ``backend.micro_batch_size`` rows sorted by length, each cut to its longest sequence
        (:func:`~.common.length_sorted_micro_batches`): every rank trains on the whole batch, so any split will do."""
        return length_sorted_micro_batches(batch, self.options.micro_batch_size)

    # --- the backend's part of the training step (TrainingBackend.sft_step / rl_step) ------------------------------
    def _forward_backward(self, batch: TokenBatch, loss_fn: LossFn) -> list[MicroStep]:
        parts = []
        for _, mb in self._micro_batches(batch):
            mb = mb.to(self.device)
            loss, metrics = loss_fn(hf_logits(self.model, mb), mb)
            loss.backward()
            parts.append(MicroStep(mb.response_mask.sum(), loss.detach(), metrics))  # read once, after the loop
        return parts

    def fuses_old_logprobs(self, num_sequences: int) -> bool:
        """``backend.old_logprobs_from_step``: ``never``; ``always`` (memory: the whole step's activations,
        every micro-batch's at once); ``auto`` when the step is one micro-batch (no extra memory) or trains on the
        CPU (host memory: the activations of ``ceil(num_sequences / micro_batch_size)`` micro-batches instead of
        one)."""
        mode = self.options.old_logprobs_from_step
        if mode != "auto":
            return mode == "always"
        return num_sequences <= self.options.micro_batch_size or self.device.type == "cpu"

    def _forward_keep(self, batch: TokenBatch, per_token) -> list[tuple[Tensor, TokenBatch, object]]:
        out = []
        for rows, mb in self._micro_batches(batch):
            mb = mb.to(self.device)
            out.append((rows, mb, per_token(hf_logits(self.model, mb), mb)))
        return out

    def _backward_kept(self, losses: list[Tensor]) -> None:
        for loss in losses:  # disjoint graphs: each is freed as soon as it is done
            loss.backward()

    def _optimizer_step(self) -> dict[str, float]:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
        return self._apply_update(grad_norm, lambda: self.optimizer.zero_grad(set_to_none=True))

    # --- checkpoints and weights --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        if not self.is_main:
            return  # every rank holds the same replica
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "rng": rng_state()}, path / "trainer_state.pt")

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_model

        path = Path(path)
        state = load_checkpoint_file(path / "trainer_state.pt")  # weights_only: refuses pickled objects (code)
        load_model(self.model, path / "model.safetensors", strict=False, device=str(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        set_rng_state(state["rng"])

    def local_module(self) -> torch.nn.Module:
        return self.model

    def export_hf(self, path: str | Path) -> None:
        if self.is_main:
            self.model.save_pretrained(path, safe_serialization=True)

    def named_full_tensors(self, ranks: Sequence[int] = (0,)) -> Iterator[tuple[str, Tensor]]:
        """Every rank holds the whole model: yields on any rank (``ranks`` needs no communication here)."""
        yield from self.model.state_dict().items()
