"""Hugging Face rollout engine: batched, KV-cached sampling with per-token log-probs (CPU or one GPU).

Decoding (``rollout.hf_decode``, or the ``decode`` argument): ``loop`` (default) runs the engine's own loop,
:func:`pipeline.rollout.hf_decode.decode` (transformers' ``DynamicCache``, one prompt pass per distinct prompt,
finished rows dropped), which draws the same random numbers as ``generate`` and so samples the same tokens;
``generate`` calls transformers' ``model.generate``. Both honour every :class:`SamplingParams` field and the same
per-batch seeding. The loop applies nothing else; ``generate`` also applies processors the checkpoint's
``generation_config.json`` asks for that the call does not override (e.g. a ``repetition_penalty``; the tiny model's
has none).

Memory: the log-probs of the sampled tokens are gathered step by step as ``generate`` runs: a forward hook on the
model keeps the latest step's logits only (in one reused buffer) and picks the chosen token's entry when that token is
fed back, so no (batch, new tokens, vocabulary) tensor is ever built; ``SamplingParams(logprobs=False)`` skips them.

Colocated with the trainer: ``HFEngine(path, tokenizer, cfg, model=module)`` samples from ``module`` itself (the
torch backend's training model, same process, same device, same dtype) instead of loading a second copy; it switches
the module to eval mode for each ``generate`` call and restores its mode afterwards, and :meth:`update_weights` is
then a no-op for the module's own tensors. :meth:`HFEngine.can_share` says when the RL stage can do this.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from evaluation.engine import Generation, RolloutEngine, SamplingParams
from pipeline.models import load_hf_model
from pipeline.rollout.hf_decode import decode

if TYPE_CHECKING:
    from pipeline.config import Config


class HFEngine(RolloutEngine):
    def __init__(self, model_path: str | Path, tokenizer: Any, cfg: Config, *, model: torch.nn.Module | None = None,
                 decode: str | None = None):
        """``model``: sample from this module's weights (shared, never copied) instead of loading ``model_path``. It
        must live on this engine's device (CUDA if available, else CPU) in the dtype the engine would load.
        ``decode``: ``loop`` | ``generate``, overriding ``cfg.rollout.hf_decode``."""
        self.decode = decode if decode is not None else cfg.rollout.hf_decode
        if self.decode not in ("loop", "generate"):
            raise ValueError(f"decode={self.decode!r}: the HF engine decodes with 'loop' or 'generate'")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if model is not None:
            if not self.can_share(model):
                p = next(model.parameters())
                raise ValueError(f"cannot share weights with a model on {p.device} in {p.dtype}: the HF engine samples "
                                 f"on {self.device}, in float32 on a CPU")
            self.model, self.shared = model, True
        else:
            self.model = load_hf_model(model_path, cfg.model, self.device).eval().requires_grad_(False)
            self.shared = False
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
        was_training = self.model.training
        self.model.eval()  # a shared training model: no dropout while sampling
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for start in range(0, len(jobs), per_batch):
                    if params.seed is not None:
                        torch.manual_seed(params.seed + start)
                    out += self._generate_batch(jobs[start:start + per_batch], params)
        finally:
            self.model.train(was_training)
        return out

    @classmethod
    def can_share(cls, module: torch.nn.Module) -> bool:
        """Whether this engine can sample from ``module`` (a trainer's whole in-process HF model) as it is: on the
        device the engine uses, in the dtype it would load (float32 on a CPU)."""
        p = next(module.parameters())
        cuda = torch.cuda.is_available()
        return p.device.type == ("cuda" if cuda else "cpu") and (cuda or p.dtype == torch.float32)

    def shard_granule(self, n: int) -> int:
        """Prompts per generation batch: the unit a call can be split in without changing what is sampled."""
        return max(1, self.batch_size // n)

    def _generate_batch(self, jobs: list[tuple[int, list[int]]], params: SamplingParams) -> list[Generation]:
        if self.decode == "loop":  # jobs: whole prompts, n consecutive samples each
            res = decode(self.model, [p for _, p in jobs[::params.n]], params, eos_id=self.eos_id, pad_id=self.pad_id,
                         device=self.device)
            lps = res.logprobs if res.logprobs is not None else [None] * len(jobs)
            return [Generation(i, ids, lp, fin)
                    for (i, _), ids, lp, fin in zip(jobs, res.token_ids, lps, res.finished, strict=True)]
        width = max(len(p) for _, p in jobs)
        input_ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, (_, p) in enumerate(jobs):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(p):] = torch.tensor(p)
            attention[row, width - len(p):] = 1
        sample = params.temperature > 0
        gen_kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=params.max_new_tokens,
                                          pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        if params.min_new_tokens > 0:
            gen_kwargs["min_new_tokens"] = params.min_new_tokens
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k if params.top_k > 0 else None)
        tracker = _ChosenTokenLogprobs() if params.logprobs else None
        hook = self.model.register_forward_hook(tracker, with_kwargs=True) if tracker is not None else None
        try:
            seqs = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                       **gen_kwargs)
        finally:
            if hook is not None:
                hook.remove()
        new = seqs[:, width:]  # (B, S)
        lps = tracker.result(new).cpu() if tracker is not None else None  # (B, S)
        new = new.cpu()
        gens = []
        for row, (prompt_index, _) in enumerate(jobs):
            ids = new[row].tolist()
            finished = self.eos_id in ids
            n = ids.index(self.eos_id) + 1 if finished else len(ids)
            gens.append(Generation(prompt_index, ids[:n], lps[row, :n].tolist() if lps is not None else None,
                                   finished))
        return gens

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        state = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"weight {name!r} is not a parameter of the rollout model")
            if self.shared:  # the trainer's own tensors: nothing to copy
                if tensor.data_ptr() != state[name].data_ptr():
                    raise RuntimeError(f"this engine shares the trainer's weights; refusing to overwrite {name!r} "
                                       f"with another tensor (it would change the trainer's model)")
                continue
            state[name].copy_(tensor.to(state[name].dtype))

    def shutdown(self) -> None:
        del self.model  # a shared model only loses this reference


class _ChosenTokenLogprobs:
    """Forward hook (``with_kwargs=True``) on the model ``generate`` runs: the log-prob, before any logits processor
    or temperature, of every token generated, in O(batch x vocabulary) memory. Call k of the model sees the token chosen
    at step k - 1 as its input and produces step k's logits; only the latest step's logits (in one reused fp32
    buffer) and their log-sum-exp are kept."""

    def __init__(self) -> None:
        self.last: Tensor | None = None  # (B, V) fp32 logits of the latest step
        self.lse: Tensor | None = None  # (B,) their log-sum-exp
        self.chosen: list[Tensor] = []  # (B,) per generated token whose successor step ran

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if self.lse is not None:
            self.chosen.append(self._pick(ids[:, -1:]))
        logits = output.logits[:, -1]
        if self.last is None or self.last.shape != logits.shape:
            self.last = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        self.last.copy_(logits)
        self.lse = torch.logsumexp(self.last, dim=-1)

    def _pick(self, tokens: Tensor) -> Tensor:  # (B, 1) -> (B,)
        return self.last.gather(-1, tokens).squeeze(-1) - self.lse

    def result(self, new: Tensor) -> Tensor:
        """(B, S) log-probs of the generated tokens ``new`` (B, S); the last token was never fed back."""
        lps = self.chosen[: new.shape[1]]
        if len(lps) < new.shape[1]:
            lps.append(self._pick(new[:, len(lps):len(lps) + 1]))
        self.last = self.lse = None
        return torch.stack(lps, dim=1) if lps else torch.zeros(new.shape, dtype=torch.float32)
