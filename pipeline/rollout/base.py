"""The rollout-engine interface, re-exported: it is defined in :mod:`evaluation.engine`, which the evaluation package
owns so that it can drive engines without importing the pipeline (layering: lampo <- evaluation <- pipeline)."""
from __future__ import annotations

from evaluation.engine import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams"]
