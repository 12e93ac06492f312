"""The rollout record: one typed structure that travels from rollout to training.

Tensor layout used everywhere in the project (every backend follows it):

* a batch of ``B`` sequences is ``prompt + response`` token ids, right-padded to ``T``: ``input_ids (B, T)``;
* per-token quantities are ``(B, T)`` and aligned with ``input_ids``: entry ``t`` of a log-prob tensor is
  ``log p(input_ids[t] | input_ids[:t])``; entry 0 has no context and is 0;
* ``response_mask (B, T)`` is 1.0 exactly on response tokens (the tokens that are trained on), 0 on prompt and padding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lampo.files import atomic_open


@dataclass
class TokenBatch:
    """Padded tensors of one (micro-)batch.

    ``input_ids`` (B, T) long; ``attention_mask`` (B, T) long; ``response_mask`` (B, T) float;
    ``old_logprobs`` / ``ref_logprobs`` (B, T) float or None; ``advantages`` (B,) float or None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    advantages: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: slice | Tensor | list[int]) -> TokenBatch:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return TokenBatch(
            pick(self.input_ids), pick(self.attention_mask), pick(self.response_mask),  # type: ignore[arg-type]
            pick(self.old_logprobs), pick(self.ref_logprobs), pick(self.advantages),
        )

    def split(self, micro_batch_size: int) -> list[TokenBatch]:
        n = len(self)
        return [self.select(slice(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]

    def to(self, device: torch.device | str) -> TokenBatch:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return TokenBatch(*(mv(getattr(self, f)) for f in self.__dataclass_fields__))  # type: ignore[arg-type]

    @staticmethod
    def from_sequences(
        prompts: list[list[int]],
        responses: list[list[int]],
        pad_id: int,
        response_logprobs: list[list[float]] | None = None,
        advantages: Tensor | None = None,
    ) -> TokenBatch:
        """Build a right-padded batch from per-sequence prompt and response ids.

        ``response_logprobs[i][k]`` is the behaviour log-prob of ``responses[i][k]``; it lands at position
        ``len(prompts[i]) + k`` of ``old_logprobs``.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        B = len(prompts)
        T = max(len(p) + len(r) for p, r in zip(prompts, responses))
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        response_mask = torch.zeros((B, T), dtype=torch.float32)
        old = torch.zeros((B, T), dtype=torch.float32) if response_logprobs is not None else None
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if not p:
                raise ValueError(f"sequence {i} has an empty prompt; every sequence needs at least one prompt token")
            n = len(p) + len(r)
            input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
            attention_mask[i, :n] = 1
            response_mask[i, len(p):n] = 1.0
            if old is not None:
                lp = response_logprobs[i]  # type: ignore[index]
                if len(lp) != len(r):
                    raise ValueError(f"sequence {i}: {len(lp)} log-probs for {len(r)} response tokens")
                old[i, len(p):n] = torch.tensor(lp, dtype=torch.float32)
        return TokenBatch(input_ids, attention_mask, response_mask, old, None, advantages)


@dataclass
class Sample:
    """One response to one prompt, as it leaves the rollout engine and gets scored.

    ``response_logprobs`` are the rollout engine's per-token log-probs (may be None when the engine does not return
    them; the training backend recomputes old log-probs by default anyway).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    group: int
    prompt: str = ""
    response: str = ""
    answer: str = ""
    reference: str = ""
    response_logprobs: list[float] | None = None
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0
    finished: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutBatch:
    """All samples of one RL iteration: ``G`` responses for each of ``P`` prompts, groups named by ``Sample.group``."""

    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def rewards(self) -> Tensor:  # (N,)
        return torch.tensor([s.reward for s in self.samples], dtype=torch.float32)

    @property
    def group_index(self) -> Tensor:  # (N,)
        return torch.tensor([s.group for s in self.samples], dtype=torch.long)

    @property
    def advantages(self) -> Tensor:  # (N,)
        return torch.tensor([s.advantage for s in self.samples], dtype=torch.float32)

    def set_advantages(self, advantages: Tensor) -> None:
        if advantages.shape != (len(self.samples),):
            raise ValueError(f"advantages of shape {tuple(advantages.shape)} for {len(self.samples)} samples")
        for s, a in zip(self.samples, advantages.tolist()):
            s.advantage = float(a)

    def subset(self, keep: Tensor | list[int] | list[bool]) -> RolloutBatch:
        """The samples picked by ``keep``: a bool mask (N,) or indices, in order (the samples are shared, not copied).
        Row ``k`` of the result is row ``k`` of ``self.to_token_batch(pad).select(keep)``, so a filter such as
        :func:`lampo.advantages.drop_uniform_groups` applied to both keeps them aligned."""
        idx = keep.tolist() if isinstance(keep, Tensor) else list(keep)
        if idx and isinstance(idx[0], bool):
            idx = [i for i, k in enumerate(idx) if k]
        return RolloutBatch([self.samples[i] for i in idx])

    def to_token_batch(self, pad_id: int) -> TokenBatch:
        lps = [s.response_logprobs for s in self.samples]
        have_lp = all(lp is not None for lp in lps)
        return TokenBatch.from_sequences(
            [s.prompt_ids for s in self.samples],
            [s.response_ids for s in self.samples],
            pad_id,
            response_logprobs=lps if have_lp else None,  # type: ignore[arg-type]
            advantages=self.advantages,
        )

    # --- persistence: JSON Lines, one sample a line, so rollouts can be kept, read by eye and replayed ---------------
    def save(self, path: str | Path) -> None:
        """Write atomically (:func:`lampo.files.atomic_open`: temporary file, fsync, then rename)."""
        with atomic_open(path) as f:
            for s in self.samples:
                f.write(json.dumps(s.__dict__, ensure_ascii=False) + "\n")

    @staticmethod
    def load(path: str | Path) -> RolloutBatch:
        samples = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    samples.append(Sample(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a rollout sample ({e})") from None
        return RolloutBatch(samples)


def check_finite(name: str, t: Tensor) -> None:
    """Raise a clear error when a tensor holds NaN or infinity."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()[:5].tolist()
        raise FloatingPointError(f"{name} has non-finite values (first at indices {bad}); check its inputs")


__all__ = ["TokenBatch", "Sample", "RolloutBatch", "check_finite"]
