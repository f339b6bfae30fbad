"""The reward-function interface shared by the trainer, evaluation and the reward registry.

A reward function takes ``(response, example)``: the decoded response text and the dataset row it
answers (verl's schema: ``prompt``, ``data_source``, ``reward_model.ground_truth``, ``extra_info``).
It returns a float or a :class:`RewardResult` (a score plus the reason). Whatever happens inside, the
caller gets a :class:`RewardResult`: an exception or a non-finite score becomes status ``error`` with
a NaN score, so it is counted and left out of the update, never silently scored 0.

Whose fault decides the score. What the candidate's answer causes is scored as a wrong answer: a
wrong or missing answer, and an answer that makes the checker run out of time (status ``timeout``:
scored ``wrong``'s score, and still counted under its own status so a rise in timeouts shows). Only a
failure of the machinery or of the data (a crashed worker, a missing dependency, an unparsable gold
answer, a reward that raised) is status ``error`` with a NaN score, left out of the update. A timeout
left out of the update instead would never be punished, so a policy could learn to time the checker
out.
"""

from __future__ import annotations

import enum
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class RewardStatus(str, enum.Enum):
    """Why a response got its score. Logged per step as counts (``reward/status_<value>``).

    ``correct``: the reward's correct score. ``wrong``, ``no_answer``, ``timeout``: the reward's wrong
    score (a finite number that is trained on). ``error``: NaN, left out of the update.
    """

    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(frozen=True)
class RewardResult:
    """A score and why. ``score`` is NaN exactly when the reward could not be computed."""

    score: float
    status: RewardStatus
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when the score can be trained on: not an ``error`` and finite (a ``timeout`` is trained on,
        with the wrong-answer score its reward gave it)."""
        return self.status is not RewardStatus.ERROR and math.isfinite(self.score)


RewardFn = Callable[[str, Mapping[str, Any]], float | RewardResult]


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function.

    Raises:
        ValueError: the spec is malformed, the module cannot be imported, or the name is missing.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r} must be given as 'module:function', e.g. 'my_rewards:score'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} for reward function {spec!r}: {exc}. "
            "Is it on PYTHONPATH (or installed)?"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no callable named {attr!r} (from {spec!r})")
    return fn


def safe_score(fn: RewardFn, response: str, example: Mapping[str, Any]) -> RewardResult:
    """Call a reward function and turn anything it does into a :class:`RewardResult`.

    A float ``s`` becomes ``RewardResult(s, CORRECT if s > 0 else WRONG)``; an exception or a
    non-finite score becomes status ``error`` with a NaN score and the reason in ``detail``.
    """
    try:
        out = fn(response, example)
    except Exception as exc:  # noqa: BLE001 - a user's reward may raise anything; it is reported, not hidden
        return RewardResult(math.nan, RewardStatus.ERROR, f"{type(exc).__name__}: {exc}")
    if isinstance(out, RewardResult):
        if out.status is not RewardStatus.ERROR and not math.isfinite(out.score):
            return RewardResult(math.nan, RewardStatus.ERROR, f"non-finite score {out.score!r}")
        return out
    try:
        score = float(out)
    except (TypeError, ValueError):
        return RewardResult(
            math.nan, RewardStatus.ERROR, f"reward returned {type(out).__name__}, not a number"
        )
    if not math.isfinite(score):
        return RewardResult(math.nan, RewardStatus.ERROR, f"non-finite score {score!r}")
    return RewardResult(score, RewardStatus.CORRECT if score > 0 else RewardStatus.WRONG)
