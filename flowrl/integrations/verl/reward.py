"""The project's rewards as a verl reward function: ``reward.custom_reward_function.path=pkg://flowrl.integrations.verl.reward``.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)`` once per response in
its reward workers. This dispatches on ``data_source`` exactly as the project's trainer does
(:func:`flowrl.rewards.registry.get_reward_fn`): math sources get the Math-Verify check (+1 correct,
-1 wrong on DAPO data, 0 otherwise; docs/algorithm.md#5-rewards), code sources run the problem's tests in the
bubblewrap sandbox (1 if all pass, else 0), so a verl run and a run of the project's trainer train on
the same reward. Needs ``flowrl[math]`` for math and ``bwrap`` on the reward workers' hosts for code.

One departure from the project's trainer, which leaves unscorable responses out of the group
normalization: verl needs a number for every response, so a reward that timed out counts as wrong, and
a reward that could not be computed at all (status ``error``: a sandbox that does not start, a row
without a ground truth) raises, stopping the run instead of training on an invented score.
"""

from __future__ import annotations

import math
from typing import Any

from flowrl.rewards import code as code_rewards
from flowrl.rewards.base import RewardStatus, safe_score
from flowrl.rewards.math import wrong_score_for
from flowrl.rewards.registry import get_reward_fn


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any
) -> float:
    """The reward of one response (verl's custom reward function signature)."""
    fn = get_reward_fn(data_source)
    example = {
        "data_source": data_source,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": dict(extra_info or {}),
    }
    result = safe_score(fn, solution_str, example)
    if result.status is RewardStatus.ERROR:
        raise RuntimeError(f"the reward of a {data_source!r} response could not be computed: {result.detail}")
    if not math.isfinite(result.score):  # a timeout: the response did not earn the reward
        return 0.0 if fn is code_rewards.code_reward else wrong_score_for(data_source)
    return float(result.score)
