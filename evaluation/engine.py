"""The rollout-engine interface: generate ``n`` samples per prompt with per-token log-probs, and take new weights.

It lives in the evaluation package, which drives any engine it is given (:func:`evaluation.run.evaluate`) and must not
depend on the pipeline; the pipeline's engines (``pipeline.rollout.hf_engine``, ``pipeline.rollout.sglang_engine``)
implement it, and :mod:`pipeline.rollout` re-exports it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 64
    seed: int | None = None  # per-call seed, so resumed runs sample the same way
    # per-token log-probs of the sampled tokens; False lets an engine skip computing them (Generation.logprobs may then
    # be None), e.g. when the trainer recomputes old log-probs anyway, or for evaluation
    logprobs: bool = True
    # EOS cannot end a response before this many new tokens (its probability is set to 0 until then, as HF's and
    # SGLang's min_new_tokens); = max_new_tokens forces full-length responses, e.g. for equal-work benchmarks
    min_new_tokens: int = 0


@dataclass
class Generation:
    """One sampled response. ``logprobs[k]`` is the engine's log-prob of ``token_ids[k]`` under the sampling
    distribution's underlying model (before temperature), or None if the engine does not report them (or was asked
    not to: ``SamplingParams.logprobs=False``)."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool  # ended with EOS (False: cut at max_new_tokens)


class RolloutEngine(ABC):
    """Constructed as ``Engine(model_path, tokenizer, cfg)``."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Sample ``params.n`` responses for each prompt; returns ``len(prompts) * n`` generations ordered by prompt,
        then sample. Response ids exclude the prompt and include the EOS token when one was produced."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load new policy weights (Hugging Face names, full tensors) in memory."""

    def update_weights_from_path(self, path: str) -> None:
        """Reload weights from a Hugging Face checkpoint folder (default: read it and call update_weights)."""
        import glob
        import os

        from safetensors.torch import load_file

        tensors: dict[str, Tensor] = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            tensors.update(load_file(f))
        self.update_weights(tensors.items())

    @classmethod
    def can_share(cls, module: Any) -> bool:
        """Whether the engine can be built with ``model=module`` to sample from a trainer's own in-process model
        instead of loading a copy (:meth:`~pipeline.backends.base.TrainingBackend.local_module`). Default: no."""
        return False

    def shard_granule(self, n: int) -> int:
        """How many prompts (of ``n`` samples each) a call may be split in without changing what is sampled
        (:mod:`pipeline.rollout.groups`). Default 1: the engine seeds each request on its own."""
        return 1

    def release_memory(self) -> None:  # noqa: B027 - optional hook
        """Free accelerator memory (weights, KV cache) while a colocated trainer runs (no-op on CPU)."""

    def reacquire_memory(self) -> None:  # noqa: B027 - optional hook
        """Undo :meth:`release_memory` before generating; weights are synced after this."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""
