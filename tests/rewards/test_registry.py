"""flowrl.rewards.registry: dispatch by data_source, batched scoring, status counts, all-failed batches."""

from __future__ import annotations

import math
import os.path
import shutil
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from flowrl.data.converters import DATASETS
from flowrl.rewards import code as code_rewards
from flowrl.rewards import math as math_rewards
from flowrl.rewards import registry
from flowrl.rewards.base import RewardResult, RewardStatus

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap missing")


def row(data_source: str, ground_truth: Any) -> dict[str, Any]:
    return {"data_source": data_source, "reward_model": {"style": "rule", "ground_truth": ground_truth}}


REWARD_OF_ABILITY = {"math": math_rewards.math_reward, "code": code_rewards.code_reward}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_prepared_dataset_is_scored_by_the_reward_of_its_ability(name: str) -> None:
    """What ``flowrl data prepare`` writes as ``data_source`` (the dataset's name) reaches the reward of the
    dataset's ability, also in upper case and with an ``org/`` prefix, as other tools write it."""
    for spelled in (name, name.upper(), f"SomeOrg/{name}"):
        assert registry.get_reward_fn(spelled) is REWARD_OF_ABILITY[DATASETS[name].ability], spelled


@pytest.mark.parametrize(
    ("data_source", "ability"),
    [("math_anything_new", "math"), ("MATH_v2", "math"), ("org/math-hard", "math"),
     ("BytedTsinghua-SIA/DAPO-Math-17k", "math"), ("AI-MO/aimo-validation-aime", "math"),
     ("openai/gsm8k", "math"), ("HuggingFaceH4/MATH-500", "math"),
     ("taco_verified", "code"), ("lcb_v5", "code"), ("someone/livecodebench_v6", "code")],
)  # fmt: skip
def test_new_variants_of_known_sources_need_no_registration(data_source: str, ability: str) -> None:
    """Any name starting with "math", or with "math", "dapo", "aime" or "gsm8k" among its words (hub ids
    as other tools write them), is math; a known code source with a suffix (a version, a filtered
    subset) is code: a new release of a dataset is scored without touching the registry."""
    assert registry.get_reward_fn(data_source) is REWARD_OF_ABILITY[ability]


def test_unknown_source_names_the_fix() -> None:
    with pytest.raises(ValueError, match="register_reward"):
        registry.get_reward_fn("my_private_set")


def test_custom_module_function_overrides_everything() -> None:
    assert registry.get_reward_fn("math_dapo", custom="os.path:basename") is os.path.basename
    with pytest.raises(ValueError, match="module:function"):
        registry.get_reward_fn("math_dapo", custom="no_colon")


def length_reward(response: str, example: Mapping[str, Any]) -> float:
    return float(len(response))


def exploding_reward(response: str, example: Mapping[str, Any]) -> float:
    raise RuntimeError("reward server down")


def test_register_reward_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_CUSTOM", {})
    registry.register_reward("my_set", length_reward)
    assert registry.get_reward_fn("my_set") is length_reward
    registry.register_reward("math", length_reward)  # a registered name wins over the built-in
    assert registry.get_reward_fn("math") is length_reward
    with pytest.raises(ValueError, match="callable"):
        registry.register_reward("x", "not callable")  # type: ignore[arg-type]


def test_score_batch_dispatches_and_never_raises_for_one_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_CUSTOM", {"len": length_reward, "boom": exploding_reward})
    responses = [
        "Answer: 3",
        "Answer: 4",
        "\\boxed{\\frac{1}{2}}",
        "\\boxed{7}",
        "abcd",
        "x",
        "y",
        "Answer: 1",
    ]
    examples = [
        row("math_dapo", "3"),  # correct: +1
        row("math_dapo", "3"),  # wrong on DAPO data: -1
        row("aime24", "0.5"),  # correct: 1
        row("aime24", "8"),  # wrong elsewhere: 0
        row("len", None),  # the user's reward: len("abcd") = 4
        row("boom", None),  # the user's reward raises -> error
        row("nobody_knows_me", "1"),  # unknown data_source -> error
        {"data_source": "math"},  # no reward_model -> error
    ]
    results = registry.score_batch(responses, examples, num_workers=2)
    assert [r.status for r in results] == [
        RewardStatus.CORRECT,
        RewardStatus.WRONG,
        RewardStatus.CORRECT,
        RewardStatus.WRONG,
        RewardStatus.CORRECT,
        RewardStatus.ERROR,
        RewardStatus.ERROR,
        RewardStatus.ERROR,
    ]
    assert [r.score for r in results[:5]] == [1.0, -1.0, 1.0, 0.0, 4.0]
    assert all(math.isnan(r.score) for r in results[5:])
    assert "reward server down" in results[5].detail
    assert "register_reward" in results[6].detail


@needs_bwrap
def test_score_batch_runs_math_and_code_together() -> None:
    add = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    tests = {"inputs": ["1 2", "5 5"], "outputs": ["3", "10"]}
    responses = [add, "\\boxed{2}", add.replace("+", "*"), "no code at all"]
    examples = [row("taco", tests), row("math500", "2"), row("apps", tests), row("deepcoder", tests)]
    results = registry.score_batch(responses, examples, num_workers=2)
    assert [(r.status, r.score) for r in results] == [
        (RewardStatus.CORRECT, 1.0),
        (RewardStatus.CORRECT, 1.0),
        (RewardStatus.WRONG, 0.0),
        (RewardStatus.NO_ANSWER, 0.0),
    ]


def test_score_batch_with_reward_fn_and_length_check() -> None:
    results = registry.score_batch(["ab", "abc"], [row("anything", None)] * 2, reward_fn=length_reward)
    assert [r.score for r in results] == [2.0, 3.0]
    with pytest.raises(ValueError, match="one example per response"):
        registry.score_batch(["a"], [])


def test_score_batch_from_a_worker_thread() -> None:
    out: list[list[RewardResult]] = []
    worker = threading.Thread(
        target=lambda: out.append(registry.score_batch(["\\boxed{\\sqrt{4}}"], [row("math", "2")]))
    )
    worker.start()
    worker.join(timeout=30)
    assert out and out[0][0].status is RewardStatus.CORRECT


def test_status_counts_has_all_five_keys() -> None:
    results = [
        RewardResult(1.0, RewardStatus.CORRECT),
        RewardResult(1.0, RewardStatus.CORRECT),
        RewardResult(0.0, RewardStatus.WRONG),
        RewardResult(math.nan, RewardStatus.TIMEOUT),
    ]
    assert registry.status_counts(results) == {
        "reward/status_correct": 2,
        "reward/status_wrong": 1,
        "reward/status_no_answer": 0,
        "reward/status_timeout": 1,
        "reward/status_error": 0,
    }
    assert set(registry.status_counts([])) == {
        "reward/status_correct",
        "reward/status_wrong",
        "reward/status_no_answer",
        "reward/status_timeout",
        "reward/status_error",
    }


def test_all_failed_batch_stops_the_run() -> None:
    failed = [
        RewardResult(math.nan, RewardStatus.ERROR, "ModuleNotFoundError: math_verify"),
        RewardResult(math.nan, RewardStatus.TIMEOUT, "Math-Verify took longer than 3 s"),
    ]
    with pytest.raises(RuntimeError, match="every reward in this batch failed") as excinfo:
        registry.check_batch_usable(failed)
    assert "ModuleNotFoundError" in str(excinfo.value)
    registry.check_batch_usable(failed + [RewardResult(0.0, RewardStatus.WRONG)])  # one usable: fine
    registry.check_batch_usable([RewardResult(-1.0, RewardStatus.NO_ANSWER)])  # zeros are not failures
    registry.check_batch_usable([])
