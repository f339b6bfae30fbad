"""flowrl.rewards.math: extraction, Math-Verify equivalence (hand-judged matches and near misses),
statuses, and the time bound on pathological answers from any thread."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from flowrl.rewards import math as fm
from flowrl.rewards.base import RewardStatus

pytest.importorskip("math_verify")

# (ground truth, response) pairs judged by hand; none of them is computed by the code under test.
# Equivalent forms: a grader must accept each response as the ground truth.
MATCH = [
    # fractions and decimals
    ("\\frac{1}{2}", "\\boxed{0.5}"),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}"),
    ("\\frac{1}{2}", "\\boxed{1/2}"),
    ("\\frac{1}{2}", "\\boxed{\\frac12}"),
    ("\\frac{1}{2}", "\\boxed{\\tfrac{1}{2}}"),
    ("\\frac{1}{2}", "\\boxed{\\frac{2}{4}}"),
    ("\\frac{1}{2}", "\\boxed{\\left(\\frac{1}{2}\\right)}"),
    ("0.5", "\\boxed{\\frac{1}{2}}"),
    ("\\frac{3}{4}", "\\boxed{0.75}"),
    ("-\\frac{1}{3}", "\\boxed{-\\frac{1}{3}}"),
    ("-\\frac{1}{3}", "\\boxed{\\frac{-1}{3}}"),
    ("\\frac{1}{3}", "\\boxed{0.333333}"),
    ("3", "\\boxed{3.0}"),
    ("3", "\\boxed{3.00}"),
    ("3", "\\boxed{\\frac{6}{2}}"),
    ("2.5", "\\boxed{2.50}"),
    ("1.5", "\\boxed{\\frac{3}{2}}"),
    ("0.1", "\\boxed{\\frac{1}{10}}"),
    # radicals
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}"),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}"),
    ("3\\sqrt{3}", "\\boxed{\\sqrt{27}}"),
    ("\\sqrt[3]{8}", "\\boxed{2}"),
    ("2+\\sqrt{3}", "\\boxed{\\sqrt{3}+2}"),
    # intervals
    ("[1,2)", "\\boxed{[1, 2)}"),
    ("(-\\infty, 3]", "\\boxed{(-\\infty,3]}"),
    ("[2,\\infty)", "\\boxed{[2, \\infty)}"),
    ("(0,1) \\cup (2,3)", "\\boxed{(0,1)\\cup(2,3)}"),
    # tuples
    ("(1,2)", "\\boxed{(1, 2)}"),
    ("(3,-1)", "\\boxed{(3, -1)}"),
    ("(\\frac{1}{2}, 2)", "\\boxed{(0.5, 2)}"),
    ("(1, 2)", "\\boxed{\\left( 1, 2 \\right)}"),
    # sets and lists of solutions
    ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}"),
    ("\\{-1, 1\\}", "\\boxed{\\{1,-1\\}}"),
    ("\\{1,2\\}", "\\boxed{\\{1,2\\}}"),
    ("1, 2", "\\boxed{2, 1}"),
    ("1,2", "\\boxed{1 \\text{ and } 2}"),
    # x = 5 against 5
    ("5", "\\boxed{x = 5}"),
    ("5", "\\boxed{x=5}"),
    ("-2", "\\boxed{y = -2}"),
    ("\\frac{1}{2}", "\\boxed{a = \\frac{1}{2}}"),
    # LaTeX text answers
    ("\\text{Monday}", "\\boxed{\\text{Monday}}"),
    ("\\text{yes}", "\\boxed{\\text{yes}}"),
    ("\\text{Monday}", "\\boxed{Monday}"),
    # thousands separators
    ("1000", "\\boxed{1,000}"),
    ("1000000", "\\boxed{1,000,000}"),
    ("12345", "\\boxed{12{,}345}"),
    ("1000", "\\boxed{1\\,000}"),
    ("1000", "\\boxed{1 000}"),
    ("1234567.5", "\\boxed{1,234,567.5}"),
    ("1,000", "\\boxed{1000}"),
    # multiple-choice letters
    ("B", "\\boxed{B}"),
    ("B", "\\boxed{(B)}"),
    ("B", "\\boxed{\\text{(B)}}"),
    ("B", "\\boxed{B)}"),
    ("B", "\\boxed{\\textbf{B}}"),
    ("B", "\\boxed{b}"),
    ("(C)", "\\boxed{C}"),
    ("D", "Answer: (D)"),
    ("A", "Option A fits.\n\nAnswer: A"),
    ("C", "\\boxed{C) 12}"),
    # the DAPO "Answer:" line
    ("42", "Let me think step by step.\nAnswer: 42"),
    ("42", "Answer: $42$"),
    ("42", "**Answer:** 42"),
    ("42", "Final Answer: 42."),
    ("\\frac{1}{2}", "answer: 0.5"),
    ("5", "Answer: \\boxed{5}"),
    ("42", "I first thought \\boxed{24}.\nAnswer: 42"),
    # \boxed variants
    ("7", "\\fbox{7}"),
    ("7", "The answer is \\boxed 7."),
    ("5", "\\boxed{5} and then \\boxed{}"),  # an empty box is no answer
    ("5", "\\boxed{5}, so the answer is \\boxed{5}."),  # the same answer twice is one answer
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}} = \\boxed{0.5}"),  # equal forms in two boxes
    ("1,-2", "The answer is \\boxed{-2} and \\boxed{1}."),  # a list gold: the boxes together
    ("\\frac{1}{2}", "$\\boxed{\\frac{1}{2}}$"),
    ("5", "\\boxed{5} and then a truncated \\boxed{6"),
    # constants, algebra, units
    ("\\pi", "\\boxed{\\pi}"),
    ("2\\pi", "\\boxed{2 \\pi}"),
    ("\\frac{\\pi}{2}", "\\boxed{\\pi/2}"),
    ("\\infty", "\\boxed{\\infty}"),
    ("x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("90^\\circ", "\\boxed{90}"),
    ("2", "\\boxed{2 \\text{ cm}}"),
    ("-1", "\\boxed{- 1}"),
    ("1+i", "\\boxed{i+1}"),
    ("12", "\\boxed{012}"),
    ("1024", "\\boxed{2^{10}}"),
    ("10", "\\boxed{\\binom{5}{2}}"),
    ("5", "\\boxed{\\$5}"),
    ("0.1", "\\boxed{10\\%}"),
    ("10", "\\boxed{5+5}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}"),
    # fallback: no box, no Answer line
    ("42", "The final answer is $42$."),
    ("7", "Adding them up, the result is 7"),
]

# Near misses: a grader must reject each.
NEAR_MISS = [
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("\\frac{1}{3}", "\\boxed{0.33}"),
    ("\\frac{1}{3}", "\\boxed{0.333}"),
    ("\\frac{3}{4}", "\\boxed{\\frac{4}{3}}"),
    ("-\\frac{1}{3}", "\\boxed{\\frac{1}{3}}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{2}}"),
    ("2", "\\boxed{\\sqrt{2}}"),
    ("[1,2)", "\\boxed{(1,2)}"),
    ("[1,2)", "\\boxed{[1,2]}"),
    ("(-\\infty, 3]", "\\boxed{(-\\infty,3)}"),
    ("(1,2)", "\\boxed{(2,1)}"),
    ("(3,-1)", "\\boxed{(-1,3)}"),
    ("\\{1,2\\}", "\\boxed{\\{1,2,3\\}}"),
    ("5", "\\boxed{x=6}"),
    ("-2", "\\boxed{y = 2}"),
    ("2", "\\boxed{x^2=4}"),
    ("5", "\\boxed{6}"),
    ("5", "\\boxed{-5}"),
    ("12", "\\boxed{21}"),
    ("1000", "\\boxed{1,001}"),
    ("1000", "\\boxed{100}"),
    ("1000", "\\boxed{1000.0000001}"),
    ("B", "\\boxed{C}"),
    ("B", "\\boxed{\\text{(C)}}"),
    ("B", "Answer: (A)"),
    ("B", "\\boxed{Both}"),
    ("\\text{Monday}", "\\boxed{\\text{Tuesday}}"),
    ("\\text{yes}", "\\boxed{\\text{no}}"),
    ("x^2+2x+1", "\\boxed{(x-1)^2}"),
    ("\\pi", "\\boxed{3.14}"),
    ("3", "\\boxed{3.01}"),
    ("\\infty", "\\boxed{-\\infty}"),
    ("1+i", "\\boxed{1-i}"),
    ("90", "\\boxed{180}"),
    ("10", "\\boxed{\\binom{5}{1}}"),
    ("42", "\\boxed{42} at first, but no.\nAnswer: 24"),
    ("5", "\\boxed{5} then \\boxed{6}"),
    # Several different boxes for a single-answer gold: a list, not a choice (box only the final answer).
    ("5", "First \\boxed{3}, then corrected: \\boxed{5}"),
    ("5", "\\boxed{" + "5" * 100_000 + "}"),
]


@pytest.mark.parametrize(("gold", "response"), MATCH, ids=[f"match-{i}" for i in range(len(MATCH))])
def test_equivalent_forms_are_correct(gold: str, response: str) -> None:
    result = fm.score(response, gold)
    assert result.status is RewardStatus.CORRECT, result.detail
    assert result.score == 1.0


@pytest.mark.parametrize(("gold", "response"), NEAR_MISS, ids=[f"miss-{i}" for i in range(len(NEAR_MISS))])
def test_near_misses_are_wrong(gold: str, response: str) -> None:
    result = fm.score(response, gold)
    assert result.status is RewardStatus.WRONG, result.detail
    assert result.score == 0.0


def test_there_are_at_least_100_hand_judged_cases() -> None:
    assert len(MATCH) + len(NEAR_MISS) >= 100


# ---- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected", "source"),
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed"),  # escaped braces do not close the box
        ("\\boxed{a_{n+1}}", "a_{n+1}", "boxed"),  # nested braces
        ("\\fbox{7}", "7", "boxed"),
        ("\\boxed 5 is it", "5", "boxed"),  # TeX: one bare token
        ("\\boxed{1} then \\boxed{2}", "1, 2", "boxed"),  # every box: a list of two
        ("\\boxed{2} and \\boxed{2}", "2", "boxed"),  # repeats are one answer
        ("\\boxed{5} and then \\boxed{}", "5", "boxed"),  # empty boxes are ignored
        ("\\boxed{\\boxed{7}}", "\\boxed{7}", "boxed"),  # a box in a box is part of the outer one
        ("<think>maybe \\boxed{3}</think> so \\boxed{4}", "4", "boxed"),  # boxes after </think> only
        ("<think>so \\boxed{3}</think> It is 3.", "3", "boxed"),  # none after it: the whole response
        ("So \\boxed{34}.\nAnswer: n is 34", "34", "answer_line"),  # the part after the copula
        ("Final Answer: The final answer is $28\\%$. I hope it is correct.", "28\\%", "answer_line"),
        ("Sum is \\boxed{255}. Final Answer: The final answer is $10,455$.", "10455", "answer_line"),
        ("Answer: Jane started 3 hours ago.", "3", "answer_line"),  # the one number in the prose
        ("Answer: 3 or 4", "3, 4", "answer_line"),  # a hedge is a list
        ("\\boxed{3 \\text{ (or 4)}}", "3, 4", "boxed"),
        ("\\boxed{1} and cut off \\boxed{2", "1", "boxed"),  # an unclosed box is skipped
        ("$\\boxed{3}$.", "3", "boxed"),
        ("work\nAnswer: 12", "12", "answer_line"),
        ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}", "answer_line"),
        ("**Final Answer:** 7", "7", "answer_line"),
        ("\\boxed{3}\nAnswer: 4", "4", "answer_line"),  # the line comes after the box
        ("Answer: 4\nactually \\boxed{5}", "5", "boxed"),  # the box comes after the line
        ("Answer: \\boxed{6} done", "6", "boxed"),  # a box inside the line wins
        ("\\boxed{1\\,000}", "1000", "boxed"),  # thousands separator removed
    ],
)
def test_extract_answer(response: str, expected: str, source: str) -> None:
    found = fm.extract_answer(response)
    assert found is not None
    assert (found.text, found.source) == (expected, source)


@pytest.mark.parametrize("response", ["", "no answer here", "\\boxed{}", "\\boxed{unclosed", "Answer:   "])
def test_extract_answer_none(response: str) -> None:
    assert fm.extract_answer(response) is None


def test_extraction_is_linear_on_long_inputs() -> None:
    start = time.monotonic()
    fm.extract_answer("Answer: " + " " * 100_000 + "x\n" + "{" * 100_000 + "\\boxed{" * 10_000)
    assert time.monotonic() - start < 1.0


# ---- statuses and scores ---------------------------------------------------------------------


@pytest.mark.parametrize("response", ["", "I do not know.", "\\boxed{}"])
def test_no_answer(response: str) -> None:
    result = fm.score(response, "42")
    assert result.status is RewardStatus.NO_ANSWER
    assert result.score == 0.0


def test_fallback_can_be_switched_off() -> None:
    assert fm.score("the result is 42", "42").status is RewardStatus.CORRECT
    assert fm.score("the result is 42", "42", fallback=False).status is RewardStatus.NO_ANSWER


def test_bad_ground_truth_is_an_error_not_a_zero() -> None:
    for gold in (None, "", ["1", "2"]):
        result = fm.score("\\boxed{1}", gold)
        assert result.status is RewardStatus.ERROR
        assert result.score != result.score  # NaN: left out of the update
        assert not result.ok


def test_is_correct() -> None:
    assert fm.is_correct("\\boxed{\\frac{2}{4}}", "0.5")
    assert not fm.is_correct("\\boxed{0.6}", "0.5")


def test_math_reward_signs_follow_the_data_source() -> None:
    # docs/algorithm.md#math: DAPO data is +1/-1; everything else 1/0.
    right, wrong = "Answer: 3", "Answer: 4"
    dapo = {"data_source": "math_dapo", "reward_model": {"ground_truth": "3"}}
    aime = {"data_source": "aime24", "reward_model": {"ground_truth": "3"}}
    assert fm.math_reward(right, dapo).score == 1.0
    assert fm.math_reward(wrong, dapo).score == -1.0
    assert fm.math_reward("nothing", dapo).score == -1.0
    assert fm.math_reward(right, aime).score == 1.0
    assert fm.math_reward(wrong, aime).score == 0.0


def test_score_many_keeps_order_and_checks_lengths() -> None:
    results = fm.score_many(["\\boxed{1}", "\\boxed{x=2}", "\\boxed{3}"], ["1", "3", "3"])
    assert [r.status for r in results] == [RewardStatus.CORRECT, RewardStatus.WRONG, RewardStatus.CORRECT]
    with pytest.raises(ValueError, match="one per response"):
        fm.score_many(["a"], ["1", "2"])


# ---- issue 13: one rule per class of false positive / false negative ----------------------------
# Each class is tested with several cases of its rule, not only the example that revealed it.

ISSUE13_CORRECT = [
    # Thousands separators: the rule still applies to real thousands; "0,111" is a decimal comma.
    ("1000", "\\boxed{1,000}"),
    ("25000", "\\boxed{25{,}000}"),
    ("0,111", "\\boxed{0.111}"),
    # Numeric golds given as numbers (str(1e16) is "1e+16"), and E notation written by either side.
    (1e16, "\\boxed{10000000000000000}"),
    (1e-05, "\\boxed{0.00001}"),
    ("1e16", "\\boxed{10^{16}}"),
    ("1e-05", "\\boxed{10^{-5}}"),
    (2.5e-07, "\\boxed{0.00000025}"),
    (3e20, "\\boxed{3 \\times 10^{20}}"),
    (1e300, "\\boxed{10^{300}}"),
    ("10000000000000000", "\\boxed{1e16}"),
    (0.5, "\\boxed{\\frac{1}{2}}"),
    (12, "Answer: 12"),
    # An empty box says nothing; the real answer before it counts.
    ("5", "\\boxed{5} and then \\boxed{}"),
    ("7", "\\boxed{7}\n\\boxed{ }"),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}} \\fbox{}"),
    ("3", "\\boxed{} \\boxed{3}"),
    ("5", "\\boxed{5} and then \\boxed{\\quad}"),  # a box of spacing is empty too
    ("5", "\\boxed{5} \\boxed{\\text{}}"),
    # A sentence-style Answer: line is reduced to its answer (and still overrides earlier boxes).
    ("34", "So \\boxed{34}.\nAnswer: n is 34"),
    ("34", "Answer: the largest such $n$ is $34$."),
    ("12", "Answer: The answer is 12."),
    ("\\frac{1}{2}", "Answer: The probability is $\\frac{1}{2}$."),
    ("5", "Answer: There are 5 ways."),
    ("34", "Answer: 34 (the largest n)"),
    ("28\\%", "Final Answer: The final answer is $28\\%$. I hope it is correct."),
    ("10455", "so \\boxed{255} is the interest. Final Answer: The final answer is $10,455$."),
    ("42", "\\boxed{41}\nFinal Answer: 42"),
    ("34", "Answer: **34**"),
    ("34", "Answer: 34. I hope it is correct."),
    # Several boxes for a list gold are read together, in any order; the fallback reads far enough.
    ("1,-2", "The answer is \\boxed{-2} and \\boxed{1}."),
    ("(2,2),(6,2)", "$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$"),
    ("\\{1,2,3\\}", "\\boxed{3}, \\boxed{1}, \\boxed{2}"),
    ("x=1, x=-2", "Roots: \\boxed{x = 1} and \\boxed{x = -2}."),
    ("7", "Hence the final answer is $7$. " + "We checked every case carefully and nothing changes. " * 20),
    # Reasoning before </think> is scratch work; the answer after it counts.
    ("5", "<think>Maybe \\boxed{3}? No.</think>\nThe answer is \\boxed{5}."),
    ("5", "<think>So \\boxed{5}.</think>\nThat is all."),
]

ISSUE13_WRONG = [
    # A leading zero group is not a thousands separator.
    ("0,111", "\\boxed{111}"),
    ("500", "\\boxed{0,500}"),
    ("250", "\\boxed{0,250}"),
    ("0,250", "\\boxed{250}"),
    ("111", "\\boxed{0\\,111}"),  # spaced groups after a zero group: not thousands either
    ("500", "\\boxed{0 500}"),
    # Multiple choice: the letter is read strictly.
    ("A", "\\boxed{A and C}"),
    ("A", "\\boxed{a = 3}"),
    ("A", "\\boxed{A, C}"),
    ("A", "\\boxed{ABCD}"),
    ("A", "\\boxed{B or A}"),
    ("(B)", "\\boxed{B and D}"),
    ("C", "\\boxed{C) 12 or D) 14}"),
    ("C", "\\boxed{c}, \\boxed{d}"),
    # Numbers given as numbers stay exact.
    (1e16, "\\boxed{1000000000000000}"),
    (1e-05, "\\boxed{0.0001}"),
    (1e16, "\\boxed{e + 16}"),
    # An empty box does not rescue a wrong answer.
    ("5", "\\boxed{6} and then \\boxed{}"),
    # Sentence-style lines: a wrong, negated or hedged sentence is not right.
    ("34", "So \\boxed{34}.\nAnswer: n is 35"),
    ("5", "Answer: 5 is not the answer"),
    ("5", "Answer: it is 5 or 6"),
    ("5", "Answer: The answer is between 4 and 6."),
    ("34", "Answer: 34. Or 35."),  # the next sentence hedges: not cut off
    ("34", "Answer: 34? Maybe 35."),
    # Several boxes: incomplete or over-complete lists, and several candidates for one answer.
    ("1,-2", "\\boxed{-2}"),
    ("1,-2", "\\boxed{-2}, \\boxed{1}, \\boxed{3}"),
    ("5", "\\boxed{5} \\boxed{6}"),
    ("6", "\\boxed{5}\n\\boxed{6}"),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}} or \\boxed{\\frac{1}{3}}"),
    ("7", "So 3 or maybe 7 works"),  # the fallback's value comes from a hedging sentence
]


@pytest.mark.parametrize(
    ("gold", "response"), ISSUE13_CORRECT, ids=[f"ok-{i}" for i in range(len(ISSUE13_CORRECT))]
)
def test_issue13_right_answers_are_correct(gold: object, response: str) -> None:
    result = fm.score(response, gold)
    assert result.status is RewardStatus.CORRECT, result.detail


@pytest.mark.parametrize(
    ("gold", "response"), ISSUE13_WRONG, ids=[f"bad-{i}" for i in range(len(ISSUE13_WRONG))]
)
def test_issue13_reward_hacks_and_wrong_answers_are_wrong(gold: object, response: str) -> None:
    result = fm.score(response, gold)
    assert result.status is RewardStatus.WRONG, result.detail
    assert result.score == 0.0


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("1,000", "1000"),
        ("12{,}345", "12345"),
        ("0,111", "0,111"),  # leading zero group: not thousands
        ("0,500", "0,500"),
        ("012,345", "012,345"),
        ("1e+16", "10000000000000000"),
        ("1e-05", "0.00001"),
        ("2.50e2", "250"),
        ("1e+300", "1 \\times 10^{300}"),
        ("e+16", "e+16"),  # not a number in E notation
        ("2e", "2e"),
    ],
)
def test_clean_answer_thousands_and_e_notation(text: str, cleaned: str) -> None:
    assert fm.clean_answer(text) == cleaned


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("\\text{(B)}", "B"),
        ("\\textbf{B}", "B"),
        ("Option B", "B"),
        ("C) 12", "C"),
        ("(C) $x^2$", "C"),
        ("C. 12", "C"),
        ("A and C", None),
        ("a = 3", None),
        ("A, C", None),
        ("ABCD", None),
        ("A or B", None),
        ("A) or C)", None),
        ("A) 12, B) 13", None),
        ("Both", None),
    ],
)
def test_multiple_choice_letter_is_read_strictly(answer: str, letter: str | None) -> None:
    assert fm._multiple_choice_letter(answer) == letter


def test_numeric_gold_is_written_out() -> None:
    assert fm._as_gold(1e16) == "10000000000000000"
    assert fm._as_gold(1e-05) == "0.00001"
    assert fm._as_gold(0.1) == "0.1"
    assert fm._as_gold(7) == "7"
    assert fm._as_gold(np.float64(1e16)) == "10000000000000000"  # repr would be "np.float64(1e+16)"
    assert fm._as_gold(np.int64(7)) == "7"
    result = fm.score("\\boxed{1}", float("nan"))
    assert result.status is RewardStatus.ERROR and not result.ok


def test_fallback_reads_beyond_the_last_300_characters() -> None:
    tail = " We double-checked each step; the reasoning holds in every case considered." * 10
    assert 300 < len(tail) < fm.FALLBACK_TAIL_CHARS  # verl reads 300: it would miss the "$12$"
    assert fm.score("The final answer is $12$." + tail, "12").status is RewardStatus.CORRECT


def test_several_candidates_never_collapse_to_one() -> None:
    """When Math-Verify reads a list of different candidates as one value (it drops "4?"), the answer is
    wrong; a real list against a list gold is compared as a set."""
    assert fm._verify_task(("4?", "5"), "", "5")[0] == RewardStatus.WRONG.value
    assert fm._verify_task(("4", "5"), "", "4, 5")[0] == RewardStatus.CORRECT.value
    assert fm._verify_task(("x = 1", "x = -2"), "", "x=1, x=-2")[0] == RewardStatus.CORRECT.value


def test_fast_paths_agree_with_math_verify() -> None:
    """Every verdict the calling process gives without SymPy is the one Math-Verify gives (run in-process
    through the worker's own task function) on a sample of numbers in several forms."""
    from fractions import Fraction

    rng = random.Random(0)
    checked = 0
    for _ in range(150):
        num, den = rng.randint(-50, 50), rng.randint(1, 16)
        value = Fraction(num, den)
        forms = [
            f"\\frac{{{num}}}{{{den}}}",
            f"{num}/{den}",
            f"x = {float(value):.6g}",
            f"{float(value):.6g}",
        ]
        if value.denominator == 1:
            forms.append(str(value.numerator))
        gold, answer = rng.choice(forms), rng.choice(forms + [f"{num + 1}", f"\\frac{{{num + 1}}}{{{den}}}"])
        gold = fm._as_gold(gold)
        fast = fm._fast_verdict((answer,), gold)
        if fast is not None:
            checked += 1
            assert fm._verify_task((answer,), "", gold)[0] == fast[0].value, (answer, gold, fast)
    assert checked >= 50


# ---- failures: the answer's fault is wrong, the machinery's is error -------------------------


def test_reward_result_ok_semantics() -> None:
    from flowrl.rewards.base import RewardResult

    assert RewardResult(-1.0, RewardStatus.TIMEOUT).ok  # a timeout scored wrong is trained on
    assert RewardResult(0.0, RewardStatus.NO_ANSWER).ok
    assert not RewardResult(float("nan"), RewardStatus.TIMEOUT).ok  # never a NaN
    assert not RewardResult(float("nan"), RewardStatus.ERROR).ok
    assert not RewardResult(0.0, RewardStatus.ERROR).ok


@pytest.mark.slow  # waits out two deadlines, one after the other
def test_a_timeout_gets_the_dapo_penalty_through_the_registry() -> None:
    """The answer that times the checker out is scored -1 (DAPO) and counted under ``timeout``."""
    from flowrl.rewards import registry

    rows = [
        {"data_source": "math_dapo", "reward_model": {"ground_truth": "5"}},
        {"data_source": "aime24", "reward_model": {"ground_truth": "5"}},
    ]
    responses = ["\\boxed{(10^{100})!}", "\\boxed{9^{9^{9^{9^{9}}}}}"]
    results = fm.score_many(
        responses,
        ["5", "5"],
        wrong_score=[fm.wrong_score_for(r["data_source"]) for r in rows],
        timeout_s=TIMEOUT_S,
    )
    assert [(r.status, r.score) for r in results] == [
        (RewardStatus.TIMEOUT, -1.0),
        (RewardStatus.TIMEOUT, 0.0),
    ]
    assert all(r.ok for r in results)
    assert registry.status_counts(results)["reward/status_timeout"] == 2
    registry.check_batch_usable(results)  # timeouts are usable rewards, not a failed batch


def test_failure_on_the_answer_is_wrong_on_the_gold_is_error() -> None:
    """The worker's own task function (run here, in-process): an exception while handling the answer
    is the candidate's fault (wrong); while handling the gold, the data's (error)."""
    status, detail = fm._verify_task((None,), "", "5")  # type: ignore[arg-type] - an answer that raises
    assert status == RewardStatus.WRONG.value and "TypeError" in detail
    status, detail = fm._verify_task(("5",), "", None)  # type: ignore[arg-type] - a gold that raises
    assert status == RewardStatus.ERROR.value and "TypeError" in detail
    status, _ = fm._verify_task(("5",), "", "\\text{}")  # a gold Math-Verify cannot parse
    assert status == RewardStatus.ERROR.value


# ---- time bounds -----------------------------------------------------------------------------

PATHOLOGICAL = {
    "tower of exponents": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "taller tower": "\\boxed{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}",
    "huge power": "Answer: 10^{10^{10}}",
    "factorial of a huge number": "\\boxed{(10^{10})!}",
    "400 nested parentheses": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    "100,000 characters in a box": "\\boxed{" + "1+" * 50_000 + "1}",
    "100,000 characters, no box": "1+" * 50_000 + "1",
    # Extraction and cleaning run in this process, outside the workers' deadline: they must be linear.
    "100,000 digits in a box": "\\boxed{" + "5" * 100_000 + "}",
    "100,000 digits after Answer:": "Answer: " + "1" * 100_000,
    "50,000 spaced digits in a box": "\\boxed{" + "1 " * 50_000 + "}",
    "100,000 decimal points in a box": "\\boxed{" + "1." * 50_000 + "e}",
}
TIMEOUT_S = 1.0
SLACK_S = 3.0  # killing and replacing a worker, plus a loaded machine


@pytest.fixture
def warm_pool() -> fm.VerifierPool:
    """The verifier pool with every worker started and ready, so a time bound measures the check, not a
    worker's start-up (the pool's first start, or the replacement of one an earlier timeout killed)."""
    pool = fm.get_pool()
    give_up = time.monotonic() + 120
    while not pool.all_ready:
        assert time.monotonic() < give_up, "the verifier workers did not start"
        n = pool.num_workers  # sqrt: no fast path, so the workers answer (and report ready on the way)
        assert all(
            r.status is RewardStatus.CORRECT for r in fm.score_many(["\\boxed{\\sqrt{4}}"] * n, ["2"] * n)
        )
        time.sleep(0.05)
    return pool


# Answers that run the checker into its deadline cost the deadline and a worker's restart each: one of
# them (and every answer whose extraction runs in this process) in the fast tier, the others slow.
TIMING_OUT = {"taller tower", "huge power", "factorial of a huge number", "400 nested parentheses"}


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(v, id=k, marks=[pytest.mark.slow] if k in TIMING_OUT else [])
        for k, v in PATHOLOGICAL.items()
    ],
)
def test_pathological_answers_are_bounded_in_time(response: str, warm_pool: fm.VerifierPool) -> None:
    start = time.monotonic()
    result = fm.score(response, "5", timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert result.status is not RewardStatus.CORRECT
    assert elapsed < TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"


def test_timeout_scores_wrong_is_counted_and_the_worker_is_replaced() -> None:
    """An answer that makes the checker overrun is the answer's fault: wrong score, status timeout."""
    pool = fm.get_pool()
    replaced = pool.replaced
    result = fm.score(PATHOLOGICAL["tower of exponents"], "5", timeout_s=TIMEOUT_S)
    assert result.status is RewardStatus.TIMEOUT
    assert result.score == 0.0 and result.ok  # trained on, as a wrong answer
    assert pool.replaced == replaced + 1
    assert fm.is_correct("\\boxed{\\sqrt{25}}", "5")  # the replacement worker answers (no fast path)


@pytest.mark.slow  # waits out the default deadline (3 s)
def test_default_deadline_from_a_non_main_thread(warm_pool: fm.VerifierPool) -> None:
    """Math-Verify's signal-based timeout fails off the main thread; ours does not."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fm.score(PATHOLOGICAL["taller tower"], "5")))
    start = time.monotonic()
    thread.start()
    thread.join(timeout=fm.DEFAULT_TIMEOUT_S + 2 * SLACK_S)
    assert not thread.is_alive()
    assert out and out[0].status is RewardStatus.TIMEOUT
    assert time.monotonic() - start < fm.DEFAULT_TIMEOUT_S + SLACK_S


def test_concurrent_callers_from_many_threads() -> None:
    cases = [(f"\\boxed{{\\sqrt{{{k * k}}}}}", str(k)) for k in range(12)]  # sqrt: no fast path
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(lambda c: fm.is_correct(*c), cases))
    assert all(verdicts)


@pytest.mark.slow  # waits out a deadline
def test_batch_with_a_pathological_answer_scores_the_rest() -> None:
    responses = ["\\boxed{\\sqrt{8}}", PATHOLOGICAL["tower of exponents"], "\\boxed{0.5}"]
    results = fm.score_many(responses, ["2\\sqrt{2}", "5", "\\frac{1}{2}"], timeout_s=TIMEOUT_S)
    assert [r.status for r in results] == [RewardStatus.CORRECT, RewardStatus.TIMEOUT, RewardStatus.CORRECT]


def test_pool_heals_after_a_worker_is_killed_from_outside() -> None:
    pool = fm.get_pool()
    assert fm.is_correct("\\boxed{\\sqrt{1}}", "1")  # workers are up (no fast path: Math-Verify)
    replaced = pool.replaced
    victim = next(w for w in pool._workers if w.ready)
    victim.proc.kill()  # e.g. the kernel's OOM killer
    victim.proc.wait()
    # Answers that need Math-Verify (no fast path), so every worker gets a task.
    first = fm.score_many(["\\boxed{\\sqrt{8}}"] * 4, ["2\\sqrt{2}"] * 4)
    # The dead worker's task (if it got one) is an error, never a silent wrong answer.
    assert {r.status for r in first} <= {RewardStatus.CORRECT, RewardStatus.ERROR}
    assert sum(r.status is RewardStatus.ERROR for r in first) <= 1
    again = fm.score_many(["\\boxed{\\sqrt{8}}"] * 4, ["2\\sqrt{2}"] * 4)
    assert all(r.status is RewardStatus.CORRECT for r in again)
    assert pool.replaced == replaced + 1


def test_a_worker_killed_while_starting_is_restarted_not_a_broken_install() -> None:
    """Once the pool has worked, a worker that dies before it is ready (killed from outside) is replaced
    and the batch is scored; raising would fail a whole training step for one killed process."""
    pool = fm.get_pool()
    assert fm.is_correct("\\boxed{\\sqrt{4}}", "2")  # the pool works
    pool._replace(pool._workers[0])  # a fresh worker, still starting
    starting = next(w for w in pool._workers if not w.ready)
    starting.proc.kill()
    starting.proc.wait()
    results = fm.score_many(["\\boxed{\\sqrt{9}}"] * 3, ["3"] * 3)
    assert [r.status for r in results] == [RewardStatus.CORRECT] * 3
    assert starting not in pool._workers
