"""Scoring one RL step's rollout, and what the run records of its rewards.

Shape legend: N sequences of the step on this rank (``num_samples`` per prompt, contiguous); "the
step's" tensors are every rank's, gathered in rank order.

:class:`Scorer` holds the run's prompts, tokenizer and reward:

* :meth:`Scorer.score`: decode this rank's responses and score them (:func:`~flowrl.rewards.registry.
  score_batch`: verifier and sandbox pools, never raising for one bad sample). It runs on the
  loop's thread, where a custom reward may use signals;
* :meth:`Scorer.collect`: failed rewards counted and reported (console and ``reward_failures.jsonl``),
  the reward tensors the update reads, gathered; raises when no rank has a usable reward;
* :meth:`Scorer.metrics`: the step's reward statistics over every rank's samples and the status counts;
* :meth:`Scorer.show_samples`: sample responses to the console and ``samples.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowrl import reports
from flowrl.distributed import DataParallel
from flowrl.rewards.base import RewardFn, RewardResult, RewardStatus
from flowrl.rewards.registry import check_batch_usable, score_batch, status_counts
from flowrl.rollout import RolloutBatch


@dataclass
class Scores:
    """One step's rewards: this rank's and the step's."""

    texts: list[str]  # this rank's N decoded responses
    results: list[RewardResult]  # their reward results
    rewards: Tensor  # (N,) float32 scores
    valid: Tensor  # (N,) bool: the reward was computed (failed ones are left out of the update)
    step_rewards: Tensor  # (N x world size,) every rank's rewards
    step_valid: Tensor  # (N x world size,) every rank's valid


class Scorer:
    """Scores responses to the run's prompts and reports on the rewards.

    Args:
        examples: the run's prompt rows (``data_source``, ``prompt``, reward fields).
        tokenizer: decodes the responses.
        reward_fn: a custom reward for every row, or None for the registry's per ``data_source``.
        num_workers: the reward pools' workers (``reward.num_workers``).
        num_samples: responses per prompt.
        dp: this process's place among the data-parallel processes.
        run_dir: where the failure and sample files go.
        report: prints a console line (rank 0's).
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        tokenizer: Any,
        reward_fn: RewardFn | None,
        *,
        num_workers: int | None,
        num_samples: int,
        dp: DataParallel,
        run_dir: Path,
        report: Callable[[str], None],
    ) -> None:
        self.examples, self.tokenizer, self.reward_fn = examples, tokenizer, reward_fn
        self.num_workers, self.n = num_workers, num_samples
        self.dp, self.run_dir, self.report = dp, run_dir, report
        sources = sorted({str(e.get("data_source")) for e in examples})
        self.source_ids = {name: k for k, name in enumerate(sources)}

    def score(self, rollout: RolloutBatch, indices: list[int]) -> tuple[list[str], list[RewardResult]]:
        """This rank's responses to the prompts ``indices``, decoded, and their reward results."""
        texts = self.tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)],
            skip_special_tokens=True,
        )
        examples = [self.examples[i] for i in indices for _ in range(self.n)]
        results = score_batch(texts, examples, reward_fn=self.reward_fn, num_workers=self.num_workers)
        return texts, results

    def collect(self, texts: list[str], results: list[RewardResult], indices: list[int], step: int) -> Scores:
        """Failures reported, the reward tensors built and gathered.

        Raises:
            RuntimeError: no rank has a usable reward (every rank raises, so all stop together).
        """
        self._report_failures(results, indices, step)
        device = self.dp.device
        rewards = torch.tensor([r.score for r in results], dtype=torch.float32, device=device)
        valid = torch.tensor([r.ok for r in results], device=device)
        step_rewards, step_valid = self.dp.gather(rewards), self.dp.gather(valid)
        if not bool(step_valid.any()):
            check_batch_usable(results)
        return Scores(texts, results, rewards, valid, step_rewards, step_valid)

    def _report_failures(self, results: list[RewardResult], indices: list[int], step: int) -> None:
        """Failed rewards counted by reason: one console line and ``reward_failures.jsonl``."""
        n = self.n
        mine = [
            (r.status.value, r.detail[:300], str(self.examples[indices[j // n]].get("data_source")))
            for j, r in enumerate(results)
            if not r.ok
        ]
        every = [f for part in self.dp.gather_object(mine) for f in part]
        if every and self.dp.is_main:
            self.report(reports.write_failures(self.run_dir, step, every))

    def metrics(self, scores: Scores, indices: list[int]) -> dict[str, float]:
        """Every rank's reward statistics (:func:`flowrl.reports.reward_metrics`) and status counts."""
        device = self.dp.device
        correct = torch.tensor([r.status is RewardStatus.CORRECT for r in scores.results], device=device)
        ids = [self.source_ids[str(self.examples[i].get("data_source"))] for i in indices]
        source = torch.tensor(ids, device=device).repeat_interleave(self.n)
        correct, source = self.dp.gather(correct), self.dp.gather(source)
        return {
            **reports.reward_metrics(
                scores.step_rewards, scores.step_valid, correct, source, list(self.source_ids)
            ),
            **self.dp.sum_dict(status_counts(scores.results)),
        }

    def show_samples(self, scores: Scores, indices: list[int], step: int, count: int) -> None:
        """The first response to each of the first ``count`` prompts, with its reward (rank 0 calls this)."""
        n = self.n
        records = [
            {
                "prompt": self.examples[indices[j]]["prompt"][-1]["content"],
                "response": scores.texts[j * n],  # the first sample of the first k prompts
                "reward": scores.results[j * n].score,
                "status": scores.results[j * n].status.value,
            }
            for j in range(min(count, len(indices)))
        ]
        self.report(reports.write_samples(self.run_dir, step, records))
