"""Unit tests of the helpers in flowrl.data.converters and flowrl.data.templates."""

from __future__ import annotations

import json

import pytest

from flowrl.data.converters import (
    DATASETS,
    Problem,
    SkipRow,
    answer_text,
    function_tests,
    last_boxed,
    limit_tests,
    load_code_tests,
    row_identifier,
    stdin_tests,
)
from flowrl.data.templates import TEMPLATES_FOR_ABILITY, check_template, render_prompt


def test_last_boxed():
    assert last_boxed("so $\\boxed{3}$ and then $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert last_boxed("nested \\boxed{\\sqrt{x^{2}}} end") == "\\sqrt{x^{2}}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("the answer is $\\boxed 5$.") == "5"
    assert last_boxed("no answer") is None
    assert last_boxed("unclosed \\boxed{3") is None


def test_answer_text():
    assert answer_text(27.0) == "27"
    assert answer_text(0.5) == "0.5"
    assert answer_text(204) == "204"
    assert answer_text("  $6$ ") == "6"
    assert answer_text(["$1$", "$-1$"]) == "1, -1"
    assert answer_text(["x"]) == "x"
    for missing in (None, "", "   ", [], float("nan"), True):
        assert answer_text(missing) is None


def test_code_test_builders_and_checker():
    assert json.loads(stdin_tests(["a", ["b", "c"]], ["1", "2"])) == {
        "inputs": ["a", "b\nc"],
        "outputs": ["1", "2"],
    }
    assert json.loads(function_tests("f", [[1, 2], 3], [3, 3])) == {
        "fn_name": "f",
        "inputs": [[1, 2], [3]],
        "outputs": [3, 3],
    }
    with pytest.raises(SkipRow, match="no tests"):
        stdin_tests([], [])
    with pytest.raises(SkipRow, match="expected a string"):
        stdin_tests([1], ["1"])
    with pytest.raises(SkipRow, match="function name"):
        function_tests("", [[1]], [1])
    with pytest.raises(ValueError, match="not JSON"):
        load_code_tests("{oops")
    with pytest.raises(ValueError, match="'inputs' and 'outputs'"):
        load_code_tests(json.dumps({"tests": []}))
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        load_code_tests(json.dumps({"inputs": ["a", "b"], "outputs": ["1"]}))
    with pytest.raises(ValueError, match="string inputs"):
        load_code_tests(json.dumps({"inputs": [1], "outputs": ["1"]}))


def test_limit_tests_keeps_longest_in_original_order():
    gt = json.dumps({"inputs": ["a", "bbbb", "cc", "ddd"], "outputs": ["1", "2", "3", "4"]})
    # lengths 1, 4, 2, 3 -> the two longest are "bbbb" and "ddd", kept in their original order
    assert json.loads(limit_tests(gt, 2)) == {"inputs": ["bbbb", "ddd"], "outputs": ["2", "4"]}
    assert limit_tests(gt, 10) == gt
    code = json.dumps({"test_code": "assert True", "entry_point": "f"})
    assert limit_tests(code, 1) == code
    with pytest.raises(ValueError, match=">= 1"):
        limit_tests(gt, 0)


def test_row_identifier_prefers_id_columns():
    assert row_identifier({"unique_id": "test/x.json", "problem": "p"}) == "unique_id=test/x.json"
    assert row_identifier({"problem": "  a   long\nproblem  "}) == "problem='a long problem'"
    assert row_identifier({}) == "?"


def test_specs_are_consistent():
    expected = {
        "math_dapo",
        "math",
        "gsm8k",
        "deepscaler",
        "aime24",
        "aime25",
        "amc23",
        "math500",
        "minerva",
        "olympiadbench",
        "deepcoder",
        "taco",
        "apps",
        "livecodebench",
        "humanevalplus",
    }
    assert set(DATASETS) == expected
    for spec in DATASETS.values():
        check_template(spec.default_template, spec.ability)  # the default template fits
        assert spec.dedupe == (spec.purpose == "train")  # benchmarks keep every problem
        assert spec.missing_columns([]) and not spec.missing_columns([alts[0] for alts in spec.columns])


def test_templates():
    problem = Problem("What is 1+1?", "2")
    assert render_prompt("raw", problem) == [{"role": "user", "content": "What is 1+1?"}]
    dapo = render_prompt("dapo", problem)[0]["content"]
    assert dapo.startswith("Solve the following math problem step by step.") and dapo.endswith(
        'after "Answer:".'
    )
    assert render_prompt("boxed", problem)[0]["content"].endswith("within \\boxed{}.")
    with pytest.raises(ValueError, match="unknown template"):
        render_prompt("chatml", problem)
    assert TEMPLATES_FOR_ABILITY["code"] == ("code", "raw")
    code = render_prompt("code", Problem("Sum two ints.", "{}", test_format="stdin"))[0]["content"]
    assert "standard input" in code and "```python" in code
