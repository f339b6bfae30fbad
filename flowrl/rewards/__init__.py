"""Verifiable rewards: the reward-function interface, math answer checking, sandboxed code execution."""

from flowrl.rewards.base import RewardFn, RewardResult, RewardStatus, load_callable, safe_score

__all__ = ["RewardFn", "RewardResult", "RewardStatus", "load_callable", "safe_score"]
