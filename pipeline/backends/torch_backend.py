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
from pipeline.backends.base import TrainingBackend
from pipeline.backends.common import (adamw_options, entropy_aligned, merge_metrics, rl_loss, rng_state, set_rng_state, sft_loss,
                                      token_logprobs_from_logits, warmup_cosine)
from pipeline.models import load_hf_model

if TYPE_CHECKING:
    from pipeline.config import Config


class TorchBackend(TrainingBackend):
    def __init__(self, cfg: Config, model_path: str | Path, *, lr: float, total_steps: int, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.0, reference: bool = False):
        self.cfg = cfg
        self.is_main = dist.is_main()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_hf_model(model_path, cfg, self.device)
        self.model.train()
        self.reference = None
        if reference:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, **adamw_options(cfg),
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio))
        self.step = 0

    # --- forward ------------------------------------------------------------------------------------------------------
    def _logits(self, model: torch.nn.Module, mb: TokenBatch) -> Tensor:
        return model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits  # (B, T, V)

    @torch.no_grad()
    def token_logprobs(self, batch: TokenBatch, *, reference: bool = False) -> Tensor:
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("no reference model: it is built only when rl.algorithm.kl_coef > 0")
        out = []
        for mb in batch.split(self.cfg.backend.micro_batch_size):
            mb = mb.to(self.device)
            lp = token_logprobs_from_logits(self._logits(model, mb), mb.input_ids)
            out.append((lp * mb.attention_mask).cpu())
        return torch.cat(out)

    # --- optimizer steps ----------------------------------------------------------------------------------------------
    def _optimizer_step(self) -> dict[str, float]:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.backend.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {grad_norm.item()} at step {self.step}; lower the learning "
                                     "rate or check the data (no update was applied)")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"grad_norm": float(grad_norm), "lr": lr}

    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        num_tokens = batch.response_mask.sum().clamp(min=1.0)
        total = 0.0
        for mb in batch.split(self.cfg.backend.micro_batch_size):
            mb = mb.to(self.device)
            lp = token_logprobs_from_logits(self._logits(self.model, mb), mb.input_ids)  # (b, T)
            loss = sft_loss(lp, mb, num_tokens.to(self.device))
            loss.backward()
            total += loss.item()
        return {"loss": total, **self._optimizer_step()}

    def rl_step(self, batch: TokenBatch) -> dict[str, float]:
        if batch.old_logprobs is None or batch.advantages is None:
            raise ValueError("rl_step needs a batch with old_logprobs and advantages")
        num_tokens = batch.response_mask.sum().clamp(min=1.0).item()
        parts, total = [], 0.0
        for mb in batch.split(self.cfg.backend.micro_batch_size):
            mb = mb.to(self.device)
            logits = self._logits(self.model, mb)
            loss, metrics = rl_loss(token_logprobs_from_logits(logits, mb.input_ids), entropy_aligned(logits), mb,
                                    self.cfg.rl.algorithm, max_len=self.cfg.rollout.max_new_tokens,
                                    num_tokens=num_tokens, num_seqs=len(batch))
            loss.backward()
            parts.append((mb.response_mask.sum().item(), metrics))
            total += loss.item()
        # the loss is the exact sum of the micro-batch shares; the other metrics are merged by token share
        return {**merge_metrics(parts), "loss": total, **self._optimizer_step()}

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
        load_model(self.model, path / "model.safetensors", strict=False, device=str(self.device))
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        set_rng_state(state["rng"])

    def export_hf(self, path: str | Path) -> None:
        if self.is_main:
            self.model.save_pretrained(path, safe_serialization=True)

    def named_full_tensors(self, ranks: Sequence[int] = (0,)) -> Iterator[tuple[str, Tensor]]:
        """Every rank holds the whole model: yields on any rank (``ranks`` needs no communication here)."""
        yield from self.model.state_dict().items()
