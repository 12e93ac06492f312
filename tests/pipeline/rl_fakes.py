"""Fakes for unit tests of the RL stage's steps (``tests/pipeline/test_rl_stage.py``): a character tokenizer, a rollout
engine that plays back scripted responses with known token ids and log-probs, a reward that records what it was asked
to score, and a training backend that records every call with the batch it got and answers with deterministic
log-probs. No model, no subprocess, no file: each step of ``pipeline.stages.rl`` can be run alone and its inputs and
outputs compared with values computed by hand."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from lampo.record import TokenBatch
from lampo.rewards.composite import RewardResult
from pipeline.config import load_config
from pipeline.rollout import Generation, RolloutEngine, SamplingParams

PAD, EOS = 0, 1


class CharTokenizer:
    """One token per character, the id is the code point; 0 pads, 1 ends a response."""

    pad_token_id = PAD
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": encode(text)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def engine_logprob(token: int, position: int) -> float:
    """The scripted engine's log-prob of a response token (distinct from the backend's, so a test can tell which
    one reached a batch)."""
    return -0.05 - 0.01 * ((token + position) % 5)


class ScriptedEngine(RolloutEngine):
    """Plays back ``script[problem]`` (one response text per sample) for the prompt whose text is ``problem``; every
    response ends with EOS. Records each call's prompts and sampling parameters."""

    def __init__(self, script: dict[str, list[str]], tokenizer: CharTokenizer):
        self.script, self.tok = script, tokenizer
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        self.calls.append(([list(p) for p in prompts], params))
        out = []
        for p, ids in enumerate(prompts):
            responses = self.script[self.tok.decode(ids)]
            assert len(responses) >= params.n, "the script has fewer responses than rollout.n_samples"
            for text in responses[: params.n]:
                tokens = encode(text) + [EOS]
                out.append(Generation(prompt_index=p, token_ids=tokens,
                                      logprobs=[engine_logprob(t, k) for k, t in enumerate(tokens)], finished=True))
        return out

    def update_weights(self, named_tensors) -> None:
        for _ in named_tensors:
            pass


@dataclass
class RecordingReward:
    """Outcome 1.0 when the stripped response equals the answer it was given, else 0.0 (reason "wrong"); records the
    arguments of every call."""

    calls: list[dict[str, list[str]]] = field(default_factory=list)

    def __call__(self, responses: list[str], *, answers: list[str], references: list[str]) -> RewardResult:
        self.calls.append({"responses": list(responses), "answers": list(answers), "references": list(references)})
        exact = [float(r.strip() == a) for r, a in zip(responses, answers)]
        return RewardResult(total=exact, components={"exact": exact},
                            reasons=[None if e else "wrong" for e in exact])


def policy_logprobs(batch: TokenBatch) -> Tensor:
    """The recording backend's per-token log-probs: a function of each token and its position only, so a row gets the
    same values whatever batch (and padding width) it is in; 0 at position 0 and on padding (the layout contract)."""
    pos = torch.arange(batch.input_ids.shape[1])
    lp = -(0.1 + 0.02 * ((batch.input_ids * 3 + pos) % 11)).to(torch.float32)
    lp[:, 0] = 0.0
    return lp * batch.attention_mask


def reference_logprobs(batch: TokenBatch) -> Tensor:
    """Like :func:`policy_logprobs`, different values: the frozen reference policy."""
    pos = torch.arange(batch.input_ids.shape[1])
    lp = -(0.3 + 0.03 * ((batch.input_ids + 2 * pos) % 7)).to(torch.float32)
    lp[:, 0] = 0.0
    return lp * batch.attention_mask


def copy_batch(batch: TokenBatch) -> TokenBatch:
    return TokenBatch(*(None if t is None else t.clone() for t in
                        (batch.input_ids, batch.attention_mask, batch.response_mask, batch.old_logprobs,
                         batch.ref_logprobs, batch.advantages)))


class RecordingBackend:
    """The calls the RL stage's training steps make, recorded with (copies of) the batches they got.

    ``rl_step`` returns metrics that identify the call: ``step`` (its index), ``rows`` (its batch size) and a
    ``ratio_max`` that differs per call. With ``on_policy=True`` the backend agrees to take a single step's old
    log-probs from its own forward (``fuses_old_logprobs``): ``rl_step_on_policy`` hands ``advantages_fn`` the
    policy's log-probs (as ``token_logprobs`` would give them, padding 0), records the batch with the old log-probs
    and the advantages it got back in ``steps``, and counts itself in ``on_policy_calls``."""

    def __init__(self, on_policy: bool = False) -> None:
        self.logprob_calls: list[tuple[TokenBatch, bool]] = []
        self.steps: list[TokenBatch] = []
        self.on_policy, self.on_policy_calls = on_policy, 0

    def fuses_old_logprobs(self, num_sequences: int) -> bool:
        return self.on_policy

    def rl_step_on_policy(self, batch: TokenBatch, advantages_fn) -> dict[str, float]:
        assert batch.old_logprobs is None and batch.advantages is None
        self.on_policy_calls += 1
        old = policy_logprobs(batch) * batch.attention_mask
        done = copy_batch(batch)
        done.old_logprobs, done.advantages = old, advantages_fn(old.clone())
        return self.rl_step(done)

    def token_logprobs(self, batch: TokenBatch, *, reference: bool = False) -> Tensor:
        self.logprob_calls.append((copy_batch(batch), reference))
        return reference_logprobs(batch) if reference else policy_logprobs(batch)

    def rl_step(self, batch: TokenBatch) -> dict[str, float]:
        self.steps.append(copy_batch(batch))
        k = len(self.steps)
        return {"step": float(k), "rows": float(len(batch)), "ratio_max": 1.0 + 0.1 * ((k * 7) % 5)}


def make_ctx(*overrides: str, tokenizer: CharTokenizer | None = None) -> Any:
    """What the RL stage's steps read from a :class:`pipeline.context.Context`: the config, the tokenizer and the pad
    id."""
    tok = tokenizer or CharTokenizer()
    return SimpleNamespace(cfg=load_config(None, list(overrides)), tokenizer=tok, pad_id=tok.pad_token_id)


def row_key(batch: TokenBatch, i: int) -> tuple[int, ...]:
    """Row ``i``'s prompt + response ids without padding: names a sequence whatever batch it is in."""
    return tuple(batch.input_ids[i][batch.attention_mask[i].bool()].tolist())


__all__ = [
    "CharTokenizer", "ScriptedEngine", "RecordingReward", "RecordingBackend", "policy_logprobs", "reference_logprobs",
    "engine_logprob", "encode", "make_ctx", "row_key", "PAD", "EOS",
]
