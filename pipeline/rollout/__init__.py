"""Rollout engines, chosen by name (``rollout.engine``); SGLang is imported only when used."""
from __future__ import annotations

import importlib

from evaluation.engine import Generation, RolloutEngine, SamplingParams
from lampo.registry import Registry

ENGINES: Registry[str] = Registry("rollout engine")
ENGINES.register("hf")("pipeline.rollout.hf_engine:HFEngine")
ENGINES.register("sglang")("pipeline.rollout.sglang_engine:SGLangEngine")


def engine_class(name: str) -> type[RolloutEngine]:
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ENGINES", "Generation", "RolloutEngine", "SamplingParams", "engine_class"]
