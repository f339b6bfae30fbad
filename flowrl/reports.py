"""What a training run reports beside its metrics, as pure functions that flowrl.scoring and the trainer call.

* :func:`reward_metrics`: the step's reward statistics (mean, spread, range, accuracy, and per
  ``data_source`` when there are several), from every rank's samples;
* :func:`write_failures`: failed rewards counted by (status, reason, data source), appended to
  ``reward_failures.jsonl``, and the console line that names the most common ones;
* :func:`write_samples`: sample responses appended to ``samples.jsonl`` and the console lines;
* :func:`write_skipped`: over-long prompts listed in ``skipped_prompts.jsonl``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

FAILURES_FILE = "reward_failures.jsonl"
SAMPLES_FILE = "samples.jsonl"
SKIPPED_FILE = "skipped_prompts.jsonl"


def reward_metrics(
    rewards: Tensor, valid: Tensor, correct: Tensor, source: Tensor, source_names: Sequence[str]
) -> dict[str, float]:
    """Reward statistics of a step's samples.

    Args:
        rewards: (N,) scores (NaN where the reward failed).
        valid: (N,) bool, the reward was computed.
        correct: (N,) bool, the reward's status is ``correct``.
        source: (N,) int, each sample's index into ``source_names``.
        source_names: the run's data sources; per-source metrics only when there are several.
    """
    scored = rewards[valid]
    out = {
        "reward/mean": float(scored.mean()),
        "reward/std": float(scored.std()) if len(scored) > 1 else 0.0,
        "reward/min": float(scored.min()),
        "reward/max": float(scored.max()),
        "reward/accuracy": float(correct[valid].float().mean()),
        "reward/failed": float((~valid).sum()),
    }
    if len(source_names) > 1:
        for k, name in enumerate(source_names):
            mine = valid & (source == k)
            if mine.any():
                out[f"reward/by_source/{name}/mean"] = float(rewards[mine].mean())
                out[f"reward/by_source/{name}/accuracy"] = float(correct[mine].float().mean())
    return out


def write_failures(run_dir: Path, step: int, failures: Sequence[tuple[str, str, str]]) -> str:
    """Append ``(status, reason, data_source)`` failures, counted, to the run's failure file; returns
    the console line."""
    counts = Counter(failures)
    with (run_dir / FAILURES_FILE).open("a") as f:
        for (status, reason, source), count in counts.most_common():
            record = {"step": step, "status": status, "data_source": source, "reason": reason, "count": count}
            f.write(json.dumps(record) + "\n")
    top = "; ".join(f"{c}x {st} ({src}): {why[:120]!r}" for (st, why, src), c in counts.most_common(3))
    return (
        f"step {step}: {len(failures)} rewards failed, left out of the update: {top} "
        f"(all reasons in {run_dir / FAILURES_FILE})"
    )


def write_samples(run_dir: Path, step: int, records: Sequence[dict[str, Any]]) -> str:
    """Append sample records (prompt, response, reward, status) to the run's samples file; returns the
    console lines."""
    lines = [f"samples at step {step}:"]
    with (run_dir / SAMPLES_FILE).open("a") as f:
        for record in records:
            f.write(json.dumps({"step": step, **record}) + "\n")
            lines.append(
                f"  [{record['status']} {record['reward']:+.2f}] {record['prompt'][:80]!r} -> "
                f"{record['response'][:160]!r}"
            )
    return "\n".join(lines)


def write_skipped(run_dir: Path, skipped: Sequence[dict[str, Any]], total: int, max_length: int) -> str:
    """List over-long prompts in the run's skipped file; returns the console line."""
    report = run_dir / SKIPPED_FILE
    report.write_text("".join(json.dumps(s) + "\n" for s in skipped))
    return (
        f"skipped {len(skipped)} of {total} prompts longer than data.max_prompt_length={max_length} "
        f"(listed in {report})"
    )
