"""Hugging Face ``generate`` rollout engine: batched, KV-cached sampling with per-token log-probs (CPU or one GPU)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.models import load_hf_model
from pipeline.rollout.base import Generation, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from pipeline.config import Config


class HFEngine(RolloutEngine):
    def __init__(self, model_path: str | Path, tokenizer: Any, cfg: Config):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_hf_model(model_path, cfg, self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = cfg.rollout.batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Batches of whole prompts, at most ``rollout.batch_size`` sequences (at least one prompt); each batch is
        sampled from one random stream seeded with ``params.seed + j``, j the request index of its first sequence, so
        a call split across engines at batch boundaries (:meth:`shard_granule`) samples exactly what one call would."""
        jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]  # ordered by prompt, then sample
        per_batch = self.shard_granule(params.n) * params.n
        out: list[Generation] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for start in range(0, len(jobs), per_batch):
                if params.seed is not None:
                    torch.manual_seed(params.seed + start)
                out += self._generate_batch(jobs[start:start + per_batch], params)
        return out

    def shard_granule(self, n: int) -> int:
        """Prompts per generation batch: the unit a call can be split in without changing what is sampled."""
        return max(1, self.batch_size // n)

    def _generate_batch(self, jobs: list[tuple[int, list[int]]], params: SamplingParams) -> list[Generation]:
        width = max(len(p) for _, p in jobs)
        input_ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, (_, p) in enumerate(jobs):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(p):] = torch.tensor(p)
            attention[row, width - len(p):] = 1
        sample = params.temperature > 0
        gen_kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=params.max_new_tokens,
                                          pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                          return_dict_in_generate=True, output_logits=True)
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k if params.top_k > 0 else None)
        res = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                  **gen_kwargs)
        new = res.sequences[:, width:].cpu()  # (B, S)
        # raw (pre-temperature) logits of every generated step -> log-probs of the chosen tokens
        logits = torch.stack(res.logits, dim=1).float().cpu()  # (B, S, V)
        lps = logits.gather(-1, new.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)  # (B, S)
        gens = []
        for row, (prompt_index, _) in enumerate(jobs):
            ids = new[row].tolist()
            finished = self.eos_id in ids
            n = ids.index(self.eos_id) + 1 if finished else len(ids)
            gens.append(Generation(prompt_index, ids[:n], lps[row, :n].tolist(), finished))
        return gens

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        state = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"weight {name!r} is not a parameter of the rollout model")
            state[name].copy_(tensor.to(state[name].dtype))

    def shutdown(self) -> None:
        del self.model
