"""Verifiable rewards: the reward-function interface, math answer checking, sandboxed code execution."""

from flowrl.rewards.base import RewardFn, RewardResult, RewardStatus, load_callable, safe_score
from flowrl.rewards.registry import (
    check_batch_usable,
    get_reward_fn,
    register_reward,
    score_batch,
    status_counts,
)

__all__ = [
    "RewardFn",
    "RewardResult",
    "RewardStatus",
    "check_batch_usable",
    "get_reward_fn",
    "load_callable",
    "register_reward",
    "safe_score",
    "score_batch",
    "status_counts",
]
