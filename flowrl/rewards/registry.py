"""Which reward scores which row, batched scoring, and the per-step status counts.

Rows carry a ``data_source`` (verl's schema). :func:`get_reward_fn` maps it to a reward function:
math benchmarks and training sets to :func:`flowrl.rewards.math.math_reward` (symbolic checking with
Math-Verify), code sets to :func:`flowrl.rewards.code.code_reward` (tests in the bubblewrap sandbox),
and anything registered with :func:`register_reward` to the user's function; ``custom="module:fn"``
overrides all of these. :func:`score_batch` is what the trainer and evaluation call once per step: it
runs the math checks in the verifier process pool and the programs in the bounded sandbox pool at the
same time, and never raises for one bad sample (that sample gets status ``error``).

:func:`status_counts` gives the counts to log every step (``reward/status_correct``, ...), so a reward
that silently returns nothing shows on the first step, and :func:`check_batch_usable` stops the run
when every reward in a batch failed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flowrl.rewards import code as code_rewards
from flowrl.rewards import math as math_rewards
from flowrl.rewards.base import RewardFn, RewardResult, RewardStatus, load_callable, safe_score

MATH_DATA_SOURCES = frozenset(
    {
        "math_dapo",
        "dapo",
        "dapo_math",
        "math",
        "math500",
        "math-500",
        "gsm8k",
        "deepscaler",
        "aime",
        "aime24",
        "aime25",
        "aime2024",
        "aime2025",
        "amc",
        "amc23",
        "minerva",
        "minerva_math",
        "olympiadbench",
        "olympiad_bench",
        "omni_math",
        "numina_math",
        "openr1_math",
        "skywork_or1_math",
    }
)
"""Math data sources (lower case, without an ``org/`` prefix); any name starting with "math" is math too."""

MATH_WORDS = frozenset({"math", "dapo", "aime", "gsm8k"})
"""A name with one of these among its words (split at anything not a letter or digit) is math: hub ids
as other tools write them (``BytedTsinghua-SIA/DAPO-Math-17k``, ``AI-MO/aimo-validation-aime``)."""

CODE_DATA_SOURCES = frozenset(
    {
        "deepcoder",
        "taco",
        "apps",
        "livecodebench",
        "lcb",
        "humaneval",
        "humanevalplus",
        "humaneval_plus",
        "mbpp",
        "mbppplus",
        "codecontests",
        "code_contests",
        "codeforces",
        "primeintellect",
        "leetcode",
        "kodcode",
    }
)
"""Code data sources; a name starting with one of these (``taco_verified``, ``lcb_v5``) is code too."""

_CUSTOM: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Score rows whose ``data_source`` is ``name`` with ``fn(response, example)``.

    Overrides the built-in mapping for that name. ``fn`` returns a float or a
    :class:`~flowrl.rewards.base.RewardResult`; exceptions become status ``error``.
    """
    if not name or not callable(fn):
        raise ValueError(f"register_reward needs a non-empty name and a callable, got {name!r}, {fn!r}")
    _CUSTOM[name] = fn


def _is_math(name: str) -> bool:
    return (
        name in MATH_DATA_SOURCES
        or name.startswith("math")
        or bool(MATH_WORDS & set(re.split(r"[^a-z0-9]+", name)))
    )


def _names(data_source: str) -> tuple[str, ...]:
    """The lower-cased name and, for ``org/name``, the part after the slash."""
    full = data_source.strip().lower()
    return (full, full.rsplit("/", 1)[-1])


def get_reward_fn(data_source: str, *, custom: str | None = None) -> RewardFn:
    """The reward function for rows of ``data_source``.

    Args:
        data_source: the row's ``data_source`` (``"math_dapo"``, ``"aime24"``, ``"taco"``, a name given
            to :func:`register_reward`, ...); an ``org/`` prefix and case are ignored for built-ins.
        custom: ``"module:function"``; when given it is used for every data source.

    Raises:
        ValueError: the data source is unknown (the message lists the known ones and how to add one).
    """
    if custom:
        return load_callable(custom)
    if data_source in _CUSTOM:
        return _CUSTOM[data_source]
    names = _names(data_source or "")
    if any(_is_math(n) for n in names):
        return math_rewards.math_reward
    if any(n in CODE_DATA_SOURCES or n.startswith(tuple(CODE_DATA_SOURCES)) for n in names):
        return code_rewards.code_reward
    raise ValueError(
        f"no reward function for data_source {data_source!r}: register one with "
        "flowrl.rewards.register_reward(name, fn) or pass a custom reward as 'module:function'. "
        f"Known math sources: {sorted(MATH_DATA_SOURCES)} (and any name starting with 'math' or with one "
        f"of the words {sorted(MATH_WORDS)}); "
        f"code sources: {sorted(CODE_DATA_SOURCES)} (and names starting with them)."
    )


def score_batch(
    responses: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    *,
    reward_fn: RewardFn | None = None,
    num_workers: int | None = None,
) -> list[RewardResult]:
    """Score a batch of responses, each with the reward of its example's ``data_source``.

    Math rows go to the verifier process pool, code rows to the sandbox pool (both at once), other
    rewards are called in this thread through :func:`~flowrl.rewards.base.safe_score`.

    Args:
        responses: N decoded responses.
        examples: the N rows they answer (verl's schema).
        reward_fn: use this reward for every row instead of dispatching by ``data_source``.
        num_workers: processes for math checks and concurrent sandboxes for programs
            (default: half the CPU cores).

    Returns:
        N results in order. A row with an unknown ``data_source``, a missing ground truth or a reward
        that raises gets status ``error`` (NaN score); nothing is silently scored 0.

    Raises:
        ValueError: ``responses`` and ``examples`` differ in length.
        flowrl.rewards.code.SandboxUnavailableError: code rows, but no usable sandbox.
    """
    if len(responses) != len(examples):
        raise ValueError(
            f"{len(responses)} responses but {len(examples)} examples; pass one example per response"
        )
    results: list[RewardResult | None] = [None] * len(responses)
    math_idx: list[int] = []
    code_idx: list[int] = []
    other: list[tuple[int, RewardFn]] = []
    for i, example in enumerate(examples):
        try:
            fn = reward_fn or get_reward_fn(str(example.get("data_source") or ""))
        except (ValueError, AttributeError) as exc:
            results[i] = RewardResult(math.nan, RewardStatus.ERROR, str(exc))
            continue
        if fn is math_rewards.math_reward:
            math_idx.append(i)
        elif fn is code_rewards.code_reward:
            code_idx.append(i)
        else:
            other.append((i, fn))

    with ThreadPoolExecutor(max_workers=1) as background:
        code_future = (
            background.submit(
                code_rewards.score_code_many,
                [responses[i] for i in code_idx],
                [examples[i] for i in code_idx],
                num_workers=num_workers,
            )
            if code_idx
            else None
        )
        golds: list[Any] = []
        for i in list(math_idx):
            try:
                golds.append(math_rewards.ground_truth_of(examples[i]))
            except ValueError as exc:
                results[i] = RewardResult(math.nan, RewardStatus.ERROR, str(exc))
                math_idx.remove(i)
        if math_idx:
            scored = math_rewards.score_many(
                [responses[i] for i in math_idx],
                golds,
                wrong_score=[math_rewards.wrong_score_for(examples[i].get("data_source")) for i in math_idx],
                num_workers=num_workers,
            )
            for i, r in zip(math_idx, scored, strict=True):
                results[i] = r
        for i, fn in other:
            results[i] = safe_score(fn, responses[i], examples[i])
        if code_future is not None:
            for i, r in zip(code_idx, code_future.result(), strict=True):
                results[i] = r
    assert all(r is not None for r in results), "every response gets a result"
    return results  # type: ignore[return-value]


def status_counts(results: Sequence[RewardResult]) -> dict[str, int]:
    """Counts per status, all five keys always present: ``reward/status_correct``, ``..._wrong``,
    ``..._no_answer``, ``..._timeout``, ``..._error``."""
    counts = Counter(r.status for r in results)
    return {f"reward/status_{s.value}": counts.get(s, 0) for s in RewardStatus}


def check_batch_usable(results: Sequence[RewardResult]) -> None:
    """Raise when no reward in the batch could be computed, instead of training on nothing.

    Raises:
        RuntimeError: no result can be trained on (status ``error``: the reward machinery failed; a
            timeout is scored wrong and trains); the message gives the counts
            and the first reasons.
    """
    if not results or any(r.ok for r in results):
        return
    reasons = Counter(r.detail[:200] for r in results).most_common(3)
    listed = "; ".join(f"{n}x {d!r}" for d, n in reasons)
    raise RuntimeError(
        f"every reward in this batch failed ({status_counts(results)}); most common reasons: {listed}. "
        "Fix the reward setup (ground-truth format, data_source mapping, math-verify install, code "
        "sandbox) before training; a batch with no usable reward would train on nothing."
    )
