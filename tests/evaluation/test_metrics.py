"""Tests of flowrl.evaluation.metrics: worked examples computed by hand and properties."""

from __future__ import annotations

import math
import random

import pytest

from flowrl.evaluation.metrics import (
    default_ks,
    distinct_n,
    diversity_summary,
    macro_average,
    majority_vote,
    mean_and_stderr,
    pass_at_k,
    problem_diversity,
    self_bleu,
    self_bleu_scores,
    sentence_bleu,
    summarize_correctness,
)

# ---------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    # n=16, c=1, k=1: 1/16
    assert pass_at_k(16, 1, 1) == pytest.approx(1 / 16)


def test_pass_at_k_matches_binomial_definition():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_1_is_fraction_correct():
    for n in range(1, 20):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_monotone_in_k():
    for n in (1, 5, 16, 64):
        for c in range(n + 1):
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False)), (n, c)


def test_pass_at_k_extremes():
    assert pass_at_k(10, 0, 5) == 0.0  # no correct sample
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k = 3: every 3-subset holds a correct sample
    assert pass_at_k(10, 10, 1) == 1.0
    # large n stays finite and in [0, 1] (binomials would overflow floats)
    value = pass_at_k(2000, 3, 1000)
    assert 0.0 < value <= 1.0


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [
        (0, 0, 1, "n"),
        (4, 5, 1, "c"),
        (4, -1, 1, "c"),
        (4, 1, 0, "k"),
        (4, 1, 5, "at least k samples"),
        (4.0, 1, 1, "int"),
        (4, True, 1, "int"),
    ],
)
def test_pass_at_k_validation(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_default_ks():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert default_ks(1) == [1]


# ---------------------------------------------------------------------------------------------
# Summaries and standard errors


def test_mean_and_stderr_hand_example():
    # values 0.5, 0.25, 0: mean 0.25; deviations 0.25, 0, -0.25 -> sum of squares 0.125;
    # sample variance 0.125 / 2 = 0.0625 -> std 0.25; stderr 0.25 / sqrt(3)
    mean, se = mean_and_stderr([0.5, 0.25, 0.0])
    assert mean == pytest.approx(0.25)
    assert se == pytest.approx(0.25 / math.sqrt(3))
    mean, se = mean_and_stderr([0.7])
    assert mean == 0.7 and math.isnan(se)
    with pytest.raises(ValueError, match="at least one problem"):
        mean_and_stderr([])


def test_summarize_correctness_hand_example():
    T, F = True, False
    correct = [[T, T, F, F], [T, F, F, F], [F, F, F, F]]
    out = summarize_correctness(correct)
    assert out["num_problems"] == 3 and out["num_samples"] == 4
    # per-problem avg 0.5, 0.25, 0 -> 0.25, stderr 0.25/sqrt(3) (see test above)
    assert out["avg@4"] == pytest.approx(0.25)
    assert out["avg@4_stderr"] == pytest.approx(0.25 / math.sqrt(3))
    assert out["pass@1"] == pytest.approx(out["avg@4"])
    # pass@2: problem 1: 1 - C(2,2)/C(4,2) = 5/6; problem 2: 1 - C(3,2)/C(4,2) = 1/2; problem 3: 0
    # mean (5/6 + 1/2) / 3 = 4/9
    assert out["pass@2"] == pytest.approx(4 / 9)
    # pass@4: 1, 1, 0 -> 2/3; stderr: deviations 1/3, 1/3, -2/3 -> sum of squares 2/3, variance 1/3,
    # se = sqrt(1/3) / sqrt(3) = 1/3
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert out["pass@4_stderr"] == pytest.approx(1 / 3)
    assert set(k for k in out if k.startswith("pass@") and not k.endswith("stderr")) == {
        "pass@1",
        "pass@2",
        "pass@4",
    }


def test_summarize_correctness_maj_and_custom_ks():
    T, F = True, False
    correct = [[T, T, F], [F, F, T], [F, F, F]]
    answers = [["7", "7", "8"], ["1", "1", "2"], [None, None, None]]
    out = summarize_correctness(correct, ks=[1, 3], answers=answers)
    # majority answers: "7" (correct), "1" (wrong), none -> maj@3 = 1/3
    assert out["maj@3"] == pytest.approx(1 / 3)
    assert "pass@2" not in out and "pass@3" in out


def test_summarize_correctness_validation():
    with pytest.raises(ValueError, match="no problems"):
        summarize_correctness([])
    with pytest.raises(ValueError, match="same number of samples"):
        summarize_correctness([[True, False], [True]])
    with pytest.raises(ValueError, match="k=5"):
        summarize_correctness([[True] * 4], ks=[5])
    with pytest.raises(ValueError, match="answer lists"):
        summarize_correctness([[True]], answers=[["1"], ["2"]])


def test_macro_average():
    summaries = {"aime24": {"avg@16": 0.2}, "math500": {"avg@16": 0.8}, "amc23": {"avg@16": 0.5}}
    assert macro_average(summaries, "avg@16") == pytest.approx(0.5)  # (0.2 + 0.8 + 0.5) / 3
    with pytest.raises(ValueError, match="missing"):
        macro_average({"a": {"avg@16": 1.0}, "b": {"avg@8": 1.0}}, "avg@16")


# ---------------------------------------------------------------------------------------------
# Majority vote


def test_majority_vote_cases():
    assert majority_vote(["a", "b", "a"], [True, False, True]) == ("a", True)
    assert majority_vote(["a", "b", "b"], [True, False, False]) == ("b", False)
    # tie 2-2: the answer seen first wins, deterministically
    assert majority_vote(["b", "a", "a", "b"], [False, True, True, False]) == ("b", False)
    assert majority_vote(["a", "b", "b", "a"], [True, False, False, True]) == ("a", True)
    # missing answers do not vote; whitespace is ignored
    assert majority_vote([None, "", " 5", "5 ", "6"], [False, False, True, True, False]) == ("5", True)
    assert majority_vote([None, None], [False, False]) == (None, False)
    with pytest.raises(ValueError, match="correctness flags"):
        majority_vote(["a"], [True, False])


# ---------------------------------------------------------------------------------------------
# Diversity


def test_distinct_n_hand_examples():
    texts = ["a b a b", "a b c"]
    # unigrams a b a b a b c: 7 in all, 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams (a b)(b a)(a b) + (a b)(b c): 5 in all, distinct {ab, ba, bc} = 3
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # token ids: [1 2] twice -> 4 unigrams, 2 distinct
    assert distinct_n([[1, 2], [1, 2]], 1) == pytest.approx(0.5)
    assert distinct_n(["a b", "c"], 3) == 0.0  # no trigram at all
    assert distinct_n(["x y z", "u v w"], 1) == 1.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["a"], 0)


def test_sentence_bleu_hand_example():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    # clipped unigrams 5/6; bigrams 3 of 5 -> (3+1)/(5+1); trigrams 2 of 4 -> 3/5; 4-grams 1 of 3 -> 2/4;
    # equal lengths -> brevity penalty 1. BLEU = (5/6 * 4/6 * 3/5 * 2/4) ** (1/4) = (1/6) ** (1/4)
    assert sentence_bleu(hyp, [ref]) == pytest.approx((1 / 6) ** 0.25)
    # brevity penalty: hypothesis of 3 tokens, reference of 6 -> exp(1 - 6/3)
    assert sentence_bleu("the cat sat", ["the cat sat on a mat"]) == pytest.approx(math.exp(-1.0))
    assert sentence_bleu("", ["a b"]) == 0.0
    assert sentence_bleu("x y", ["a b"]) == 0.0  # no unigram matches


def test_self_bleu_identical_and_different():
    same = ["the answer is 42 because six times seven"] * 4
    assert self_bleu(same) == pytest.approx(1.0)
    different = [
        "the answer is 42",
        "we get forty two at the end",
        "compute 6 * 7 = 42 directly",
        "hmm no idea",
    ]
    assert self_bleu(different) < 0.5
    partly = ["the answer is 42", "the answer is 42", "completely other words here", "nothing shared at all"]
    assert self_bleu(different) < self_bleu(partly) < 1.0
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


def test_self_bleu_fast_path_equals_reference_loop():
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "e"]
    for _ in range(30):
        texts = [
            " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(2, 6))
        ]
        fast = self_bleu_scores(texts)
        slow = [sentence_bleu(t, texts[:i] + texts[i + 1 :]) for i, t in enumerate(texts)]
        assert fast == pytest.approx(slow, abs=1e-12)


def test_problem_diversity_and_summary():
    responses = [["a b", "a b", "c d"], ["x y z", "x y w", "q r s"]]
    answers = [["1", "1", "2"], ["5", None, "6"]]
    correct = [[True, True, False], [True, False, True]]
    entropies = [[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]]
    p0 = problem_diversity(responses[0], answers=answers[0], correct=correct[0], entropies=entropies[0])
    assert p0["distinct_answers"] == 2.0  # "1", "2"
    assert p0["distinct_correct_answers"] == 1.0  # only "1" is correct
    assert p0["token_entropy"] == pytest.approx(0.2)
    assert p0["distinct_1"] == pytest.approx(4 / 6)  # a b a b c d: 4 distinct of 6
    out = diversity_summary(responses, answers=answers, correct=correct, entropies=entropies)
    # distinct answers: 2 and 2 ("5", "6"); distinct correct: 1 and 2 -> 1.5
    assert out["distinct_answers"] == pytest.approx(2.0)
    assert out["distinct_correct_answers"] == pytest.approx(1.5)
    assert out["token_entropy"] == pytest.approx((0.2 + 1.0) / 2)
    assert {"distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu", "self_bleu_stderr"} <= set(
        out
    )
    # token ids give the same distinct-n as the equivalent whitespace tokens
    ids = diversity_summary([[[1, 2], [1, 2], [3, 4]]])
    assert ids["distinct_1"] == pytest.approx(problem_diversity(responses[0])["distinct_1"])


def test_diversity_summary_validation():
    with pytest.raises(ValueError, match="no problems"):
        diversity_summary([])
    with pytest.raises(ValueError, match="answers lists"):
        diversity_summary([["a", "b"]], answers=[["1", "2"], ["3", "4"]])
    # one response per problem: no self-BLEU, the rest still computed
    out = diversity_summary([["a b"], ["c d"]])
    assert "self_bleu" not in out and out["distinct_1"] == 1.0
