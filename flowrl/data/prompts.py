"""The training prompts: tokenized once, drawn in seeded shuffled epochs.

:func:`load_prompts` tokenizes the rows of the training files and skips (and lists) prompts over
``data.max_prompt_length``; :class:`PromptSampler` draws ``prompts_per_step`` of them per RL step, its
position saved in every checkpoint, so a resumed run draws what a straight one would.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flowrl.policy import encode_prompt
from flowrl.preflight import InputError


@dataclass
class PromptSet:
    """Training prompts after tokenization; over-long ones are skipped and listed in ``skipped``."""

    examples: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    skipped: list[dict[str, Any]] = field(default_factory=list)


def load_prompts(
    rows: list[dict[str, Any]], files: list[str], tokenizer: Any, max_prompt_length: int
) -> PromptSet:
    """Tokenize the prompts of ``rows`` (read from ``files``, one entry per row); skip (and record)
    those over ``max_prompt_length``."""
    examples, prompt_ids, skipped = [], [], []
    position: dict[str, int] = defaultdict(int)  # row number within its file
    for row, path in zip(rows, files, strict=True):
        i = position[path]
        position[path] += 1
        ids = encode_prompt(tokenizer, row["prompt"])
        if len(ids) > max_prompt_length:
            skipped.append({"file": path, "row": i, "tokens": len(ids), "reason": "prompt too long"})
            continue
        examples.append(row)
        prompt_ids.append(ids)
    if not examples:
        why = (
            f" (all {len(skipped)} prompts exceed data.max_prompt_length={max_prompt_length})"
            if skipped
            else ""
        )
        raise InputError(
            f"no training prompts in {sorted(set(files))}{why}; "
            "check data.train_files / data.max_prompt_length"
        )
    return PromptSet(examples, prompt_ids, skipped)


class PromptSampler:
    """Seeded shuffled epochs over the prompts; its position is part of every checkpoint."""

    def __init__(self, size: int, *, seed: int, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.cursor = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            take = order[self.cursor : self.cursor + k - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
