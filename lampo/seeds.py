"""Seed derivation: every random stream of a run, derived from one seed in one place.

``derive_seed(seed, stream, *key)`` is the only place where a seed is mixed with anything. The formulas are the ones
the project used before they were gathered here, kept exactly so that earlier runs and the figures in README.md
reproduce; they are not a design to copy (a hash of ``(seed, stream, key)`` would be), but changing one changes every
sampled token.

The streams (``stream``: its key -> its value; where it is used):

* ``init``: no key -> ``seed``. ``torch.manual_seed`` before each stage (``pipeline.runner``); the tiny model's
  initial weights (``pipeline.context``); Megatron's model-parallel RNG (``init_parallel``, which adds Megatron's own
  per-rank offsets); the SGLang server's ``random_seed``.
* ``sft_order``: ``epoch`` -> the ``random.Random`` seed of the string ``"{seed}/{epoch}"``. The order of the SFT
  examples in each epoch, and of the RL prompts (``pipeline.data.batch_indices``).
* ``rollout``: ``iteration`` -> ``seed * 100_003 + iteration``. The ``SamplingParams.seed`` of an RL iteration's
  rollout; the engines add the request index to it (a shard starting at prompt ``a`` adds ``a * n``:
  ``pipeline.rollout.groups``), so a sequence's seed does not depend on how the prompts are sharded.
* ``rl_minibatches``: ``iteration`` -> ``seed * 7919 + iteration``. The ``torch.Generator`` that draws an RL
  iteration's mini-batches (``pipeline.stages.rl.update``).
* ``eval``: ``benchmark, first_index`` -> ``(seed * 1_000_003 + crc32(benchmark) + first_index) % 2**31``. The
  ``SamplingParams.seed`` of the evaluation batch that starts at problem ``first_index`` of ``benchmark``
  (``evaluation.run``), so a resumed evaluation redraws a batch exactly.
* ``tiny_split``: ``name, split`` -> the ``random.Random`` seed of the string ``"lampo-{name}/{split}/{seed}"``. The
  problems of the tiny task's ``split`` (``evaluation.tiny_task.make_split``; ``name`` is ``tiny`` or ``tinyN``).
* ``choices``: ``question`` -> the first 8 bytes, big-endian, of ``sha256("{seed}\\0{question}")``. The option order of
  a multiple-choice question (``evaluation.benchmarks.shuffled_choices``): it depends on the question text only, not
  on the order of the rows.

For the two string-keyed streams the value is the integer ``random.seed`` derives from that string (CPython's version-2
string seeding: the UTF-8 bytes followed by their SHA-512, read big-endian), so ``random.Random(value)`` is the
generator ``random.Random(string)`` was; it is meant for ``random.Random``, not for ``torch`` (it has ~600 bits).
"""
from __future__ import annotations

import hashlib
import zlib


def _string_seed(text: str) -> int:
    """The integer ``random.Random(text)`` seeds itself with."""
    b = text.encode()
    return int.from_bytes(b + hashlib.sha512(b).digest(), "big")


def _key(stream: str, key: tuple[int | str, ...], *types: type) -> tuple:
    if len(key) != len(types) or any(isinstance(k, bool) or not isinstance(k, t) for k, t in zip(key, types)):
        want = ", ".join(t.__name__ for t in types) or "nothing"
        raise TypeError(f"seed stream {stream!r} takes a key of ({want}); got {key!r}")
    return key


def derive_seed(seed: int, stream: str, *key: int | str) -> int:
    """The seed of ``stream`` for ``key``, derived from the run's ``seed`` (the table in this module's docstring)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, not {seed!r}")
    if stream == "init":
        _key(stream, key)
        return seed
    if stream == "sft_order":
        (epoch,) = _key(stream, key, int)
        return _string_seed(f"{seed}/{epoch}")
    if stream == "rollout":
        (it,) = _key(stream, key, int)
        return seed * 100_003 + it
    if stream == "rl_minibatches":
        (it,) = _key(stream, key, int)
        return seed * 7919 + it
    if stream == "eval":
        benchmark, first = _key(stream, key, str, int)
        return (seed * 1_000_003 + zlib.crc32(benchmark.encode()) + first) % 2**31
    if stream == "tiny_split":
        name, split = _key(stream, key, str, str)
        return _string_seed(f"lampo-{name}/{split}/{seed}")
    if stream == "choices":
        (question,) = _key(stream, key, str)
        return int.from_bytes(hashlib.sha256(f"{seed}\x00{question}".encode()).digest()[:8], "big")
    raise ValueError(f"unknown seed stream {stream!r}; the streams are {', '.join(STREAMS)}")


STREAMS = ("init", "sft_order", "rollout", "rl_minibatches", "eval", "tiny_split", "choices")

__all__ = ["STREAMS", "derive_seed"]
