"""Evaluation metrics: avg@n, unbiased pass@k, maj@n, and judge-free diversity measures.

Shape legend: P problems, n samples per problem. ``correct`` is P lists of n booleans (sample j of
problem i passed the verifier); ``answers`` is P lists of n extracted final answers (``None`` where
none was extracted); ``responses`` is P lists of n response texts.

Conventions (field notes section 5): a per-problem value is computed from that problem's n samples,
then averaged over problems with equal weight; the standard error is the sample standard deviation
(ddof=1) of the per-problem values over sqrt(P) (NaN for a single problem). avg@n is the mean
correctness over the n samples (= pass@1 with n samples); pass@k is the unbiased estimator of Chen et
al. 2021 (arXiv 2107.03374); maj@n is the correctness of the most common extracted answer
(DeepSeek-R1's cons@64). Diversity measures (field notes section 6): distinct final answers, distinct
correct answers, distinct-n (Li et al. 2016, arXiv 1510.03055), self-BLEU (Zhu et al. 2018, Texygen,
arXiv 1802.01886) and mean token entropy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

Tokens = str | Sequence[int]  # a text (split on whitespace) or token ids


# ---------------------------------------------------------------------------------------------
# Aggregation


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean: sample std (ddof=1) / sqrt(len); stderr NaN for one value.

    Raises:
        ValueError: ``values`` is empty.
    """
    if len(values) == 0:
        raise ValueError("cannot average an empty list of values; evaluate at least one problem")
    m = len(values)
    mean = math.fsum(values) / m
    if m == 1:
        return mean, math.nan
    variance = math.fsum((v - mean) ** 2 for v in values) / (m - 1)
    return mean, math.sqrt(variance / m)


def _add_mean(out: dict[str, Any], key: str, values: Sequence[float]) -> None:
    out[key], out[f"{key}_stderr"] = mean_and_stderr(values)


# ---------------------------------------------------------------------------------------------
# Correctness


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374).

    pass@k = 1 - C(n-c, k) / C(n, k), the probability that k samples drawn without replacement from
    the n include a correct one. Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which avoids the huge
    binomials; it is 1 when n - c < k (every k-subset holds a correct sample).

    Raises:
        ValueError: n < 1, c outside [0, n], or k outside [1, n] (generate at least k samples).
    """
    for label, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {label} must be an int, got {value!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: n (samples per problem) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c (correct samples) must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass_at_k: k must be between 1 and n={n}, got {k}; generate at least k samples per problem"
        )
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... (powers of two below n) and n itself."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def _normalize_answer(answer: Any) -> Hashable | None:
    if answer is None:
        return None
    if isinstance(answer, str):
        answer = answer.strip()
        return answer or None
    return answer


def majority_vote(answers: Sequence[Any], correct: Sequence[bool]) -> tuple[Any, bool]:
    """The most common extracted answer of one problem and whether it is correct (maj@n, cons@n).

    Answers are compared exactly after stripping whitespace (normalize them first, e.g. with the math
    reward's normalizer, to merge ``0.5`` and ``\\frac{1}{2}``); ``None`` or empty answers do not vote.
    Ties go to the answer that appears first in sample order. The voted answer is correct when more
    than half of the samples that gave it were graded correct (with a deterministic verifier they
    all agree).

    Args:
        answers: (n,) extracted answers.
        correct: (n,) whether each sample was graded correct.

    Returns:
        ``(answer, is_correct)``; ``(None, False)`` when no sample has an answer.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_vote: {len(answers)} answers but {len(correct)} correctness flags")
    votes: Counter[Hashable] = Counter()
    first_seen: dict[Hashable, int] = {}
    graded: dict[Hashable, list[bool]] = {}
    for j, (answer, ok) in enumerate(zip(answers, correct, strict=True)):
        key = _normalize_answer(answer)
        if key is None:
            continue
        votes[key] += 1
        first_seen.setdefault(key, j)
        graded.setdefault(key, []).append(bool(ok))
    if not votes:
        return None, False
    winner = min(votes, key=lambda a: (-votes[a], first_seen[a]))
    flags = graded[winner]
    return winner, sum(flags) * 2 > len(flags)


def _check_rectangular(name: str, rows: Sequence[Sequence[Any]], n: int) -> None:
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(
                f"{name}: problem {i} has {len(row)} samples but problem 0 has {n}; every problem needs the "
                "same number of samples (count a failed generation or an errored reward as incorrect)"
            )


def problem_metrics(
    correct: Sequence[bool], ks: Sequence[int] | None = None, answers: Sequence[Any] | None = None
) -> dict[str, Any]:
    """The metrics of one problem from its n samples.

    Returns:
        ``{"num_correct", "avg", "pass@k" for each k}`` and, with ``answers``, ``"maj_answer"`` and
        ``"maj"`` (1.0 or 0.0).
    """
    n = len(correct)
    c = sum(bool(x) for x in correct)
    out: dict[str, Any] = {"num_correct": c, "avg": c / n if n else math.nan}
    for k in ks if ks is not None else default_ks(n):
        out[f"pass@{k}"] = pass_at_k(n, c, k)
    if answers is not None:
        answer, ok = majority_vote(answers, correct)
        out["maj_answer"], out["maj"] = answer, float(ok)
    return out


def summarize_correctness(
    correct: Sequence[Sequence[bool]],
    ks: Sequence[int] | None = None,
    *,
    answers: Sequence[Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Benchmark summary: avg@n, pass@k and (given answers) maj@n, each with its standard error.

    Args:
        correct: (P, n) correctness of every sample; the same n for every problem.
        ks: the k of pass@k (default 1, 2, 4, ... and n); each must be in [1, n].
        answers: (P, n) extracted final answers, for maj@n.

    Returns:
        ``{"num_problems": P, "num_samples": n, "avg@n", "avg@n_stderr", "pass@k", "pass@k_stderr",
        ..., "maj@n", "maj@n_stderr"}`` with the literal n and k in the keys (``"avg@16"``).

    Raises:
        ValueError: no problems, a problem without samples, problems with different n, a k outside
            [1, n], or ``answers`` not shaped like ``correct``.
    """
    if len(correct) == 0:
        raise ValueError("summarize_correctness: no problems to summarize")
    n = len(correct[0])
    if n == 0:
        raise ValueError("summarize_correctness: problem 0 has no samples")
    _check_rectangular("summarize_correctness", correct, n)
    ks = list(ks) if ks is not None else default_ks(n)
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(
                f"summarize_correctness: pass@{k} needs 1 <= k <= n={n}; sample more or drop k={k}"
            )
    if answers is not None:
        if len(answers) != len(correct):
            raise ValueError(
                f"summarize_correctness: {len(answers)} answer lists for {len(correct)} problems"
            )
        _check_rectangular("summarize_correctness answers", answers, n)
    per_problem = [
        problem_metrics(row, ks, None if answers is None else answers[i]) for i, row in enumerate(correct)
    ]
    out: dict[str, Any] = {"num_problems": len(correct), "num_samples": n}
    _add_mean(out, f"avg@{n}", [p["avg"] for p in per_problem])
    for k in ks:
        _add_mean(out, f"pass@{k}", [p[f"pass@{k}"] for p in per_problem])
    if answers is not None:
        _add_mean(out, f"maj@{n}", [p["maj"] for p in per_problem])
    return out


def macro_average(summaries: dict[str, dict[str, Any]], metric: str) -> float:
    """Unweighted mean of ``metric`` over benchmarks (the paper's headline: mean avg@16 of six math sets).

    Raises:
        ValueError: no summaries, or a benchmark without ``metric``.
    """
    if not summaries:
        raise ValueError("macro_average: no benchmark summaries")
    missing = [name for name, s in summaries.items() if metric not in s]
    if missing:
        raise ValueError(f"macro_average: {metric!r} is missing for {missing}; evaluate them with the same n")
    return math.fsum(s[metric] for s in summaries.values()) / len(summaries)


# ---------------------------------------------------------------------------------------------
# Diversity


def _tokens(text: Tokens) -> list[Any]:
    return text.split() if isinstance(text, str) else list(text)


def _ngrams(tokens: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[Tokens], n: int) -> float:
    """Distinct-n of a problem's responses: unique n-grams / total n-grams, pooled over the responses.

    Texts are split on whitespace; sequences of token ids are used as they are. 1.0 means no n-gram
    repeats anywhere; 0.0 is returned when there is no n-gram at all (every response shorter than n).
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = [g for t in texts for g in _ngrams(_tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _bleu_from_stats(matches: Sequence[int], totals: Sequence[int], hyp_len: int, ref_len: int) -> float:
    """BLEU from clipped n-gram matches and hypothesis n-gram counts, orders 1..N.

    Smoothing: add-one on orders >= 2 (Lin & Och 2004, "BLEU+1"; method 2 of Chen & Cherry 2014), so a
    long response with no matching 4-gram scores low rather than exactly 0; an unmatched unigram
    precision still gives 0. Brevity penalty exp(1 - r/c) when the hypothesis (c tokens) is shorter
    than the closest reference (r tokens).
    """
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_p = 0.0
    for order, (m, t) in enumerate(zip(matches, totals, strict=True), start=1):
        s = 0 if order == 1 else 1
        log_p += math.log((m + s) / (t + s))
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p / len(matches))


def _closest_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def sentence_bleu(hypothesis: Tokens, references: Sequence[Tokens], max_n: int = 4) -> float:
    """BLEU-``max_n`` of one hypothesis against several references (see :func:`_bleu_from_stats`).

    N-gram counts are clipped by the largest count in any one reference (Papineni et al. 2002).
    """
    if not references:
        raise ValueError("sentence_bleu: needs at least one reference")
    hyp = _tokens(hypothesis)
    refs = [_tokens(r) for r in references]
    matches, totals = [], []
    for order in range(1, max_n + 1):
        hyp_counts = Counter(_ngrams(hyp, order))
        max_ref: Counter[tuple[Any, ...]] = Counter()
        for ref in refs:
            max_ref |= Counter(_ngrams(ref, order))
        matches.append(sum(min(c, max_ref[g]) for g, c in hyp_counts.items()))
        totals.append(sum(hyp_counts.values()))
    return _bleu_from_stats(matches, totals, len(hyp), _closest_length(len(hyp), [len(r) for r in refs]))


def self_bleu_scores(texts: Sequence[Tokens], max_n: int = 4) -> list[float]:
    """BLEU of each response against all the others of the same problem as references.

    Equal to ``[sentence_bleu(t_i, texts without t_i) ...]`` but linear in the total number of n-grams:
    for each n-gram it keeps the two largest per-response counts, so "the largest count among the
    others" is the top count unless response i holds it.
    """
    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 responses per problem, got {len(texts)}")
    token_lists = [_tokens(t) for t in texts]
    lengths = [len(t) for t in token_lists]
    matches = [[0] * max_n for _ in texts]
    totals = [[0] * max_n for _ in texts]
    for order in range(1, max_n + 1):
        counts = [Counter(_ngrams(t, order)) for t in token_lists]
        top: dict[tuple[Any, ...], list[int]] = {}  # n-gram -> [best count, holder, second best count]
        for j, cnt in enumerate(counts):
            for g, c in cnt.items():
                entry = top.get(g)
                if entry is None:
                    top[g] = [c, j, 0]
                elif c > entry[0]:
                    top[g] = [c, j, entry[0]]
                elif c > entry[2]:
                    entry[2] = c
        for i, cnt in enumerate(counts):
            m = 0
            for g, c in cnt.items():
                best, holder, second = top[g]
                m += min(c, second if holder == i else best)
            matches[i][order - 1] = m
            totals[i][order - 1] = sum(cnt.values())
    scores = []
    for i in range(len(texts)):
        others = lengths[:i] + lengths[i + 1 :]
        scores.append(
            _bleu_from_stats(matches[i], totals[i], lengths[i], _closest_length(lengths[i], others))
        )
    return scores


def self_bleu(texts: Sequence[Tokens], max_n: int = 4) -> float:
    """Self-BLEU of one problem's responses: mean BLEU-4 of each against the others (Zhu et al. 2018).

    1.0 for identical responses; lower means more diverse. Needs at least 2 responses.
    """
    scores = self_bleu_scores(texts, max_n)
    return math.fsum(scores) / len(scores)


def problem_diversity(
    responses: Sequence[Tokens],
    *,
    answers: Sequence[Any] | None = None,
    correct: Sequence[bool] | None = None,
    entropies: Sequence[float] | None = None,
    ns: Sequence[int] = (1, 2, 3, 4),
) -> dict[str, float]:
    """Diversity of one problem's n responses (texts or token ids).

    Returns:
        ``distinct_<n>`` for each n in ``ns``; ``self_bleu`` (when n >= 2); with ``answers``:
        ``distinct_answers`` (distinct non-empty extracted answers); with ``answers`` and ``correct``:
        ``distinct_correct_answers``; with ``entropies`` (per-sample mean token entropy):
        ``token_entropy``.
    """
    out: dict[str, float] = {f"distinct_{n}": distinct_n(responses, n) for n in ns}
    if len(responses) >= 2:
        out["self_bleu"] = self_bleu(responses)
    if answers is not None:
        if len(answers) != len(responses):
            raise ValueError(f"problem_diversity: {len(answers)} answers for {len(responses)} responses")
        keys = [_normalize_answer(a) for a in answers]
        out["distinct_answers"] = float(len({k for k in keys if k is not None}))
        if correct is not None:
            if len(correct) != len(responses):
                raise ValueError(
                    f"problem_diversity: {len(correct)} correctness flags for {len(responses)} responses"
                )
            out["distinct_correct_answers"] = float(
                len({k for k, ok in zip(keys, correct, strict=True) if ok and k is not None})
            )
    if entropies is not None:
        if len(entropies) != len(responses):
            raise ValueError(f"problem_diversity: {len(entropies)} entropies for {len(responses)} responses")
        out["token_entropy"] = math.fsum(entropies) / len(entropies)
    return out


def diversity_summary(
    responses: Sequence[Sequence[Tokens]],
    *,
    answers: Sequence[Sequence[Any]] | None = None,
    correct: Sequence[Sequence[bool]] | None = None,
    entropies: Sequence[Sequence[float]] | None = None,
    ns: Sequence[int] = (1, 2, 3, 4),
) -> dict[str, float]:
    """Per-problem diversity (:func:`problem_diversity`) averaged over problems, with standard errors.

    Args:
        responses: (P, n) response texts (split on whitespace) or token ids.
        answers: (P, n) extracted final answers.
        correct: (P, n) correctness (used with ``answers`` for distinct correct answers).
        entropies: (P, n) per-sample mean token entropies.
        ns: the n of distinct-n.

    Returns:
        Each key of :func:`problem_diversity` averaged over problems, plus ``<key>_stderr``.
        ``self_bleu`` is left out when some problem has fewer than 2 responses.
    """
    if len(responses) == 0:
        raise ValueError("diversity_summary: no problems")
    for name, other in (("answers", answers), ("correct", correct), ("entropies", entropies)):
        if other is not None and len(other) != len(responses):
            raise ValueError(f"diversity_summary: {len(other)} {name} lists for {len(responses)} problems")
    per_problem = [
        problem_diversity(
            r,
            answers=None if answers is None else answers[i],
            correct=None if correct is None else correct[i],
            entropies=None if entropies is None else entropies[i],
            ns=ns,
        )
        for i, r in enumerate(responses)
    ]
    out: dict[str, float] = {}
    for key in per_problem[0]:
        if all(key in p for p in per_problem):
            _add_mean(out, key, [p[key] for p in per_problem])
    return out
