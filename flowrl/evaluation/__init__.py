"""Evaluation: the metrics (avg@n, unbiased pass@k, maj@n, diversity) and the generation runner."""

from flowrl.evaluation.metrics import (
    default_ks,
    distinct_n,
    diversity_summary,
    macro_average,
    majority_vote,
    mean_and_stderr,
    pass_at_k,
    problem_diversity,
    problem_metrics,
    self_bleu,
    self_bleu_scores,
    sentence_bleu,
    summarize_correctness,
)

__all__ = [
    "default_ks",
    "distinct_n",
    "diversity_summary",
    "macro_average",
    "majority_vote",
    "mean_and_stderr",
    "pass_at_k",
    "problem_diversity",
    "problem_metrics",
    "self_bleu",
    "self_bleu_scores",
    "sentence_bleu",
    "summarize_correctness",
]
