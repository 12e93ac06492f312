"""Rewards: one registry ``REWARDS`` (name -> reward class) and :func:`build_reward` for the driver.

Names: ``math`` (outcome, math-verify), ``choice`` (outcome, option letter), ``rouge_l`` (dense, the paper's),
``semantic_density`` (dense, the model card's). Every reward is batched and returns one float per response; see
:mod:`lampo.rewards.base` for the call contract and :mod:`lampo.rewards.composite` for r = outcome + alpha * dense.
"""
from lampo.rewards import choice, math_answer, rouge, semantic  # noqa: F401 - importing registers each reward
from lampo.rewards.base import REWARDS, Reward, Scores
from lampo.rewards.composite import CompositeReward, RewardResult, build_reward

__all__ = ["REWARDS", "Reward", "Scores", "CompositeReward", "RewardResult", "build_reward"]
