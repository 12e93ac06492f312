"""The total reward r = r_outcome + alpha * r_dense, with every component kept for logging.

    reward = build_reward("math", "rouge_l", alpha=0.1, timeout_s=5.0, model_path=None)
    out = reward(responses, answers=answers, references=references)
    out.total              # (N,) floats, what the advantage estimator sees
    out.components         # {"math": (N,), "rouge_l": (N,)}
    out.reasons            # (N,) why an item failed ("math: timed out after 5 s"), else None
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from lampo.rewards.base import REWARDS, Reward


@dataclass
class RewardResult:
    """``total`` (N,) = outcome + alpha * dense; ``components`` name -> (N,) raw scores; ``reasons`` (N,)."""

    total: list[float]
    components: dict[str, list[float]]
    reasons: list[str | None]


class CompositeReward:
    """An outcome reward plus ``alpha`` times an optional dense reward; ``alpha`` is ignored without a dense one."""

    def __init__(self, outcome: Reward, dense: Reward | None = None, alpha: float = 0.0):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha={alpha!r} must be a finite number >= 0")
        self.outcome, self.dense, self.alpha = outcome, dense, float(alpha)

    def __call__(self, responses: list[str], *, answers: list[str], references: list[str]) -> RewardResult:
        parts = [self.outcome] + ([self.dense] if self.dense is not None else [])
        scored = {r.name: r.score(responses, answers=answers, references=references) for r in parts}
        total = list(scored[self.outcome.name].values)
        if self.dense is not None:
            total = [o + self.alpha * d for o, d in zip(total, scored[self.dense.name].values)]
        reasons = []
        for i in range(len(responses)):
            why = [f"{name}: {s.reasons[i]}" for name, s in scored.items() if s.reasons[i] is not None]
            reasons.append("; ".join(why) or None)
        return RewardResult(total, {name: s.values for name, s in scored.items()}, reasons)


def _construct(name: str, options: dict[str, Any]) -> Reward:
    """Build REWARDS[name] with the options its constructor names; the others are for the other reward."""
    cls = REWARDS[name]
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in params})


def build_reward(outcome: str, dense: str | None = None, alpha: float = 0.0, **options: Any) -> CompositeReward:
    """The driver's one entry point: reward names from the config, one options dict shared by both rewards.

    Each reward's constructor receives only the options its signature names (``timeout_s`` reaches ``math``,
    ``model_path`` reaches ``semantic_density``); an option that no chosen reward names is ignored, so one config
    section can serve every reward combination. ``None`` option values are passed through (each reward documents
    what None means, e.g. the default embedding model).
    """
    if dense is not None and dense == outcome:
        raise ValueError(f"dense reward {dense!r} is also the outcome reward; pick a different dense reward or None")
    return CompositeReward(_construct(outcome, options), _construct(dense, options) if dense else None, alpha)
