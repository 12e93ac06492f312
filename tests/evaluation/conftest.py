"""Shared helpers for the evaluation tests: where the real benchmark data lives, and a scripted rollout engine."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from torch import Tensor

from evaluation.engine import Generation, RolloutEngine, SamplingParams

SHARED_DATA = Path(os.environ.get("LAMPO_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "../shared/data")).resolve()
REAL_FILES = {"math500": "math500.jsonl", "aime24": "aime24.jsonl", "aime25": "aime25.jsonl",
              "gsm8k": "gsm8k_test.jsonl"}


@pytest.fixture
def shared_data() -> Path:
    missing = [f for f in REAL_FILES.values() if not (SHARED_DATA / f).is_file()]
    if missing:
        pytest.skip(f"benchmark data not found in {SHARED_DATA} (missing {', '.join(missing)}); "
                    "set LAMPO_SHARED_DATA to the folder holding math500.jsonl etc.")
    return SHARED_DATA


@pytest.fixture
def char_tokenizer():
    """The tiny model's character tokenizer: decode(encode(x)) == x for printable ASCII, no chat template."""
    from pipeline.tiny import build_tokenizer

    return build_tokenizer()


class ScriptedEngine(RolloutEngine):
    """A test-only engine: the response to sample ``s`` of a prompt is ``respond(prompt_text, s)``.

    Records every call (``calls``: the number of prompts per call and the seed) and can raise after ``fail_after``
    calls, to simulate a kill in the middle of a run.
    """

    def __init__(self, tokenizer, respond: Callable[[str, int], str], fail_after: int | None = None):
        self.tokenizer = tokenizer
        self.respond = respond
        self.fail_after = fail_after
        self.calls: list[tuple[int, int | None]] = []
        self.prompts_seen: list[str] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append((len(prompts), params.seed))
        out = []
        for i, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.prompts_seen.append(text)
            for s in range(params.n):
                resp = self.tokenizer(self.respond(text, s), add_special_tokens=False)["input_ids"]
                resp = resp[: params.max_new_tokens]
                finished = len(resp) < params.max_new_tokens
                out.append(Generation(i, resp + ([self.tokenizer.eos_token_id] if finished else []), None, finished))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        raise NotImplementedError("the scripted engine has no weights")
