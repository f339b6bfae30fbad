"""Reward functions that fail on purpose, for the trainer's failure-handling tests."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import Any

from flowrl.data import synthetic

_calls = itertools.count()


def every_third_fails(response: str, example: Mapping[str, Any]) -> float:
    """Raises on every third call and returns NaN on every third-plus-one; otherwise the demo reward."""
    i = next(_calls)
    if i % 3 == 0:
        raise RuntimeError("reward service unavailable")
    if i % 3 == 1:
        return float("nan")
    return synthetic.reward(response, example).score


def always_nan(response: str, example: Mapping[str, Any]) -> float:
    return float("nan")


def nan_on_odd_ground_truth(response: str, example: Mapping[str, Any]) -> float:
    """NaN for prompts with an odd ground truth (a failure with a known reason), else the share of digits."""
    if int(example["reward_model"]["ground_truth"]) % 2:
        return float("nan")
    return sum(c.isdigit() for c in response) / max(1, len(response))


def slow_digit_share(response: str, example: Mapping[str, Any]) -> float:
    """The share of digits, after sleeping $SLOW_REWARD_S seconds: steps long enough to signal into."""
    time.sleep(float(os.environ.get("SLOW_REWARD_S", "0")))
    return sum(c.isdigit() for c in response) / max(1, len(response))
