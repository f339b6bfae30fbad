"""An external oracle for the math reward: Math-Verify's own published test expectations.

``fixtures/math_verify_cases.jsonl`` holds every (gold, prediction, expected verdict) case stated by the
tests of huggingface/Math-Verify (file, line, test and commit recorded per case; rebuilt by
``fixtures/make_math_verify_cases.py``). Each prediction is scored as a model response through
:func:`flowrl.rewards.math.score_many`. FlowRL must agree on at least 95% of the cases, and every case
where it does not must carry an explanation in the fixture (``disagreement``): either a rule of
:mod:`flowrl.rewards.math` (``gold-in-box``: the gold is parsed inside ``\\boxed{}``) or a non-default
Math-Verify option the case's test passes (``option:precision``, ``option:strict``,
``option:match_types``, ``option:allow_set_relation_comp``). Each explanation is checked against
Math-Verify itself: with its default options (or with the gold boxed, for ``gold-in-box``) Math-Verify
gives FlowRL's verdict, with the case's own options it gives the expected one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from flowrl.rewards import math as fm
from flowrl.rewards.base import RewardStatus

pytest.importorskip("math_verify")

FIXTURE = Path(__file__).parent / "fixtures" / "math_verify_cases.jsonl"
CASES: list[dict[str, Any]] = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
MIN_AGREEMENT = 0.95
OPTION_RULES = {"option:precision", "option:strict", "option:match_types", "option:allow_set_relation_comp"}
RULES = OPTION_RULES | {"gold-in-box"}


@pytest.fixture(scope="module")
def verdicts() -> dict[str, int]:
    """FlowRL's verdict (1 correct, 0 not) per case id."""
    results = fm.score_many([c["pred"] for c in CASES], [c["gold"] for c in CASES])
    return {c["id"]: int(r.status is RewardStatus.CORRECT) for c, r in zip(CASES, results, strict=True)}


def _math_verify(case: dict[str, Any], *, own_options: bool, box_gold: bool = False) -> int:
    """Math-Verify's verdict on a case, with the case's options or with Math-Verify's defaults."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = "\\boxed{" + case["gold"] + "}" if box_gold else case["gold"]
    if case.get("api") == "parse_verify_defaults":  # the test calls parse() and verify() bare
        targets = None
    else:
        kinds = case["match_types"] if own_options else ["latex", "expr"]
        targets = [
            LatexExtractionConfig(boxed_match_priority=0) if k == "latex" else ExprExtractionConfig()
            for k in kinds
        ]

    def parsed(text: str) -> list[Any]:
        if targets is None:
            return parse(text, parsing_timeout=None)
        return parse(text, targets, parsing_timeout=None)

    options = {"float_rounding": 6, "strict": True, "allow_set_relation_comp": False}
    if own_options:
        options = {
            "float_rounding": case["precision"],
            "strict": case["strict"],
            "allow_set_relation_comp": case["allow_set_relation_comp"],
        }
    return int(verify(parsed(gold), parsed(case["pred"]), timeout_seconds=None, **options))


def test_fixture_records_where_each_case_came_from() -> None:
    assert len(CASES) >= 250
    assert len({c["id"] for c in CASES}) == len(CASES)
    for case in CASES:
        assert case["repo"] == "huggingface/Math-Verify"
        assert re.fullmatch(r"[0-9a-f]{40}", case["commit"])
        assert re.fullmatch(r"tests/test_\w+\.py:\d+", case["source"]), case["source"]
        assert case["test"].startswith("test_")
        assert case["expected"] in (0, 1)
    # Both verdicts occur, so agreement cannot come from answering always yes or always no.
    assert sum(c["expected"] == 0 for c in CASES) >= 30
    assert sum(c["expected"] == 1 for c in CASES) >= 200


def test_agreement_with_math_verify_expectations(verdicts: dict[str, int]) -> None:
    agree = sum(verdicts[c["id"]] == c["expected"] for c in CASES)
    assert agree / len(CASES) >= MIN_AGREEMENT, f"{agree}/{len(CASES)}"


def test_every_disagreement_is_explained_and_every_explanation_is_a_disagreement(
    verdicts: dict[str, int],
) -> None:
    disagree = {c["id"] for c in CASES if verdicts[c["id"]] != c["expected"]}
    explained = {c["id"] for c in CASES if c["disagreement"]}
    assert disagree - explained == set(), "disagreements without an explanation in the fixture"
    assert explained - disagree == set(), "explanations for cases that now agree: remove them"
    for case in CASES:
        if case["disagreement"]:
            assert case["disagreement"]["rule"] in RULES
            assert len(case["disagreement"]["why"]) > 40


@pytest.mark.parametrize("case", [c for c in CASES if c["disagreement"]], ids=lambda c: c["id"])
def test_each_explanation_holds_in_math_verify(case: dict[str, Any]) -> None:
    """The reason given is the real one: undo it and Math-Verify itself gives FlowRL's verdict."""
    rule = case["disagreement"]["rule"]
    assert _math_verify(case, own_options=True) == case["expected"]  # the fixture reads the test right
    if rule in OPTION_RULES:
        assert _math_verify(case, own_options=False) != case["expected"], "the option makes the difference"
    else:
        assert _math_verify(case, own_options=True, box_gold=True) != case["expected"], "the box does"
