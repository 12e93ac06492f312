"""The stages, by name, in the order a run may chain them. Each is a module with ``run(ctx)``."""
from __future__ import annotations

import importlib
from collections.abc import Callable

from lampo.registry import Registry

STAGES: Registry[str] = Registry("stage")
for _name in ("sft", "rl", "rollout", "evaluate"):
    STAGES.register(_name)(f"pipeline.stages.{_name}")


def stage_fn(name: str) -> Callable:
    return importlib.import_module(STAGES[name]).run
