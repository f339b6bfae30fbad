"""Reward functions that fail on purpose, for the trainer's failure-handling tests."""

from __future__ import annotations

import itertools
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
