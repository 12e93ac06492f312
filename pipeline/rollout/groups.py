"""Rollout groups: which ranks form which rollout engine, and how one call's prompts are split among the engines.

``rollout.tensor_parallel`` (k) consecutive ranks form one engine; a world of W ranks holds W / k engines, each
started by the first rank of its group (its *leader*) on the group's devices (SGLang ``tp_size=k``,
``base_gpu_id`` = the leader's local rank). On CPU with the HF engine, k = 1: every rank runs an engine.

Splitting. A call's prompts are cut into contiguous shards, one per engine, balanced by prompt in units of the
engine's *granule* (:meth:`RolloutEngine.shard_granule`): every sample of a prompt stays on one engine. The engine
seeds the sequence at request index j of a call (prompt-major: prompt p, sample s is j = p * n + s) from
``SamplingParams.seed + j``; a shard starting at prompt a is generated with ``seed + a * n``. So the shards together
hold what one engine would have produced for the whole call: SGLang seeds every request (granule 1 prompt); the HF
engine draws a whole generation batch of ``rollout.batch_size`` sequences from one random stream seeded by the
batch's first request, so its granule is a whole batch, and a call smaller than one batch runs on one engine.

Gathering. Each leader scores what it generated; :func:`all_gather` then hands every rank the leaders' results in
engine order, which is prompt order, so every training rank holds the same scored batch. One engine (one process,
or k = W) is the degenerate case: no collective is made.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from evaluation.engine import SamplingParams
from pipeline import dist


@dataclass(frozen=True)
class RolloutGroups:
    world_size: int
    rank: int
    size: int  # k: ranks (devices) per engine

    @classmethod
    def current(cls, size: int) -> RolloutGroups:
        """The groups of this process's world (``torch.distributed`` if initialised, else torchrun's variables)."""
        world, rank = dist.world_size(), dist.rank()
        if size < 1 or world % size:
            raise ValueError(f"rollout.tensor_parallel={size} must divide the world size {world} (each rollout "
                             "engine spans that many ranks)")
        return cls(world, rank, size)

    @classmethod
    def from_config(cls, cfg: Any) -> RolloutGroups:
        """``rollout.tensor_parallel`` ranks per engine; with ``rollout.sglang_urls``, one engine per server, each
        driven by the first rank of world / len(urls) consecutive ranks."""
        urls = cfg.rollout.sglang_urls
        if not urls:
            return cls.current(cfg.rollout.tensor_parallel)
        world = cls.current(1).world_size
        if world % len(urls):
            raise ValueError(f"rollout.sglang_urls lists {len(urls)} servers, which does not divide the world size "
                             f"{world}: each server is driven by an equal group of ranks")
        return cls.current(world // len(urls))

    @property
    def n_engines(self) -> int:
        return self.world_size // self.size

    @property
    def engine_index(self) -> int:
        return self.rank // self.size

    @property
    def is_leader(self) -> bool:
        """This rank starts and drives its group's engine, and scores what it generates."""
        return self.rank % self.size == 0

    def leaders(self) -> list[int]:
        return list(range(0, self.world_size, self.size))

    def shards(self, n_prompts: int, granule: int = 1) -> list[range]:
        """Contiguous shards of ``range(n_prompts)``, one per engine, cut at multiples of ``granule`` prompts and
        balanced in whole granules (the first engines take one more when they do not divide evenly)."""
        if granule < 1:
            raise ValueError(f"granule={granule} must be >= 1")
        units = -(-n_prompts // granule)
        base, extra = divmod(units, self.n_engines)
        out, start = [], 0
        for e in range(self.n_engines):
            stop = min(n_prompts, start + (base + (e < extra)) * granule)
            out.append(range(start, stop))
            start = stop
        return out

    def my_shard(self, n_prompts: int, granule: int = 1) -> range:
        return self.shards(n_prompts, granule)[self.engine_index]


def shard_params(params: SamplingParams, shard: range) -> SamplingParams:
    """The sampling parameters of a shard that starts at prompt ``shard.start`` of the call (see the module doc)."""
    return params if params.seed is None else replace(params, seed=params.seed + shard.start * params.n)


def all_gather(obj: Any, groups: RolloutGroups) -> list[Any]:
    """Every leader's ``obj``, in engine order, on every rank (non-leaders contribute nothing). Identity-like in one
    process. The collective is bounded by the process group's timeout (``run.collective_timeout_min``): a rank that
    died makes the others fail with an error, not hang."""
    box = dist.all_gather(obj if groups.is_leader else None)
    return [box[r] for r in groups.leaders()] if len(box) > 1 else box
