"""Hedging never pays: for each answer type, responses that hedge score not correct.

``fixtures/math_hedges.json`` lists, per answer type (integer, fraction, expression, interval, set, tuple,
multiple choice, text), responses that name several candidates, every choice, a range or set that merely
contains the gold, or ``A or B``; each must be not correct for every gold the group names (the right one
and the other candidates). The same groups list plain right answers in the forms models write, which
must stay correct, so a rule cannot pass by rejecting everything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flowrl.rewards import math as fm
from flowrl.rewards.base import RewardStatus

pytest.importorskip("math_verify")

FIXTURE = Path(__file__).parent / "fixtures" / "math_hedges.json"
GROUPS: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["groups"]
TYPES = {"integer", "fraction", "expression", "interval", "set", "tuple", "multiple_choice", "text"}


def test_every_answer_type_has_hedges() -> None:
    assert {g["type"] for g in GROUPS} == TYPES
    for group in GROUPS:
        assert len(group["hedges"]) >= 5 and group["right"] and len(group["golds"]) >= 2


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"{g['type']}-{g['golds'][0]}")
def test_hedges_are_not_correct(group: dict[str, Any]) -> None:
    hedges = group["hedges"]
    passed = []
    for gold in group["golds"]:
        results = fm.score_many(hedges, [gold] * len(hedges))
        passed += [
            (gold, h, r.detail)
            for h, r in zip(hedges, results, strict=True)
            if r.status is RewardStatus.CORRECT
        ]
    assert passed == [], "hedges scored correct"


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"{g['type']}-{g['golds'][0]}")
def test_plain_right_answers_stay_correct(group: dict[str, Any]) -> None:
    right = group["right"]
    results = fm.score_many(right, [group["golds"][0]] * len(right))
    missed = [
        (r_, res.detail)
        for r_, res in zip(right, results, strict=True)
        if res.status is not RewardStatus.CORRECT
    ]
    assert missed == [], "right answers scored not correct"


def test_dapo_hedge_gets_the_wrong_score() -> None:
    """A hedge is an ordinary wrong answer: -1 on DAPO data, not left out of the update."""
    example = {"data_source": "math_dapo", "reward_model": {"ground_truth": "5"}}
    result = fm.math_reward("\\boxed{4} \\boxed{5}", example)
    assert (result.status, result.score) == (RewardStatus.WRONG, -1.0)
