"""The stages, by name, in the order a run may chain them: the one description of each (its folder in the run, whether
it trains, what its state's step counts). Each is a module ``pipeline.stages.<name>`` with ``run(ctx)``, which ends
with :meth:`pipeline.context.Context.finish_stage`. Stage modules do not import each other: what two stages share
lives outside this package (``pipeline.data``, ``pipeline.rollout.collect``, ``pipeline.sharded_eval``)."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from lampo.registry import Registry


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str  # where it writes in the run folder (``reset_stage`` removes it)
    trains: bool  # builds a training backend, checkpoints, exports ``<folder>/final``: the next stage's input
    unit: str = "step"  # what its state's ``step`` counts

    @property
    def module(self) -> str:
        return f"pipeline.stages.{self.name}"

    def run(self) -> Callable:
        return importlib.import_module(self.module).run


STAGES: Registry[Stage] = Registry("stage")
for _stage in (Stage("sft", "sft", trains=True), Stage("rl", "rl", trains=True, unit="iteration"),
               Stage("rollout", "rollout", trains=False), Stage("evaluate", "eval", trains=False)):
    STAGES.register(_stage.name)(_stage)

#: the training stages in run order: each starts from the newest finished output of those before it
TRAINING_STAGES = tuple(name for name, s in STAGES.items() if s.trains)


def stage_fn(name: str) -> Callable:
    return STAGES[name].run()
