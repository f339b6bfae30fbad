"""The rollout interface. Shape legend: N = prompts x n sequences (the n samples of one prompt are
contiguous), P prompt tokens (left-padded), T response tokens (right-padded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. The defaults are the paper's training rollout (temperature 1.0, no truncation)."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 256
    return_logprobs: bool = False  # log-probs of the sampled tokens under the temperature-scaled distribution
    # Keep sampling after EOS up to max_new_tokens, every token counting as response (vLLM's ignore_eos):
    # a fixed-length workload for benchmarks. The sampling distribution is unchanged (EOS is not banned).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RolloutBatch:
    """Sampled responses. Row ``i`` answers prompt ``i // n``."""

    prompt_ids: Tensor  # (N, P) left-padded with the pad id
    prompt_mask: Tensor  # (N, P) 1 on real prompt tokens
    response_ids: Tensor  # (N, T) right-padded with the pad id; includes the EOS token when one was produced
    response_mask: Tensor  # (N, T) 1 on response tokens up to and including EOS
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens
    sampling_logprobs: Tensor | None = None  # (N, T) float32 when asked for, 0 on padding

    @property
    def input_ids(self) -> Tensor:
        """(N, P + T) the full sequences, as the policy forward takes them."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(N, P + T)."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> Tensor:
        """(N,) number of response tokens."""
        return self.response_mask.sum(-1)


class RolloutEngine(Protocol):
    """What the trainer needs from a generation engine."""

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> RolloutBatch:
        """Sample ``params.n`` responses for each prompt (token ids, no padding). ``seeds``, one per
        prompt, make each prompt's samples a function of its seed alone; without them the engine draws
        its randomness from torch's generator."""
        ...

    def sync_weights(self, policy_model: nn.Module) -> None:
        """Make the engine sample from the policy's current weights (the log Z head is never sent)."""
        ...

    def release_memory(self) -> None:
        """Free what generation holds on the device while the trainer runs its update."""
        ...


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to ``(B, L)`` ids and mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids.to(device), mask.to(device)


def assemble(
    expanded: list[list[int]],
    tokens: Tensor,
    logprobs: Tensor | None,
    params: SamplingParams,
    *,
    pad_token_id: int,
    eos_token_ids: list[int],
) -> RolloutBatch:
    """A :class:`RolloutBatch` from an engine's output.

    Args:
        expanded: the prompt of every row (a prompt repeated ``n`` times), as token lists.
        tokens: (N, t) sampled tokens; anything after a row's end is ignored.
        logprobs: when ``params.return_logprobs``, (N, t) their log-probs; else None.
        params: the sampling parameters the rows were drawn with.
        pad_token_id: the tokenizer's pad id.
        eos_token_ids: the ids that end a response; a row's response runs up to and including the first.
    """
    device = tokens.device
    prompt_ids, prompt_mask = left_pad(expanded, pad_token_id, device)
    response_ids = tokens.long()
    if params.ignore_eos:  # every row ran to max_new_tokens; all of it is response
        response_mask = torch.ones_like(response_ids)
        truncated = torch.ones(len(expanded), dtype=torch.bool, device=device)
    else:
        is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, dtype=torch.long, device=device))
        # Keep tokens up to and including the first EOS; everything after it is padding.
        eos_before = is_eos.long().cumsum(-1) - is_eos.long()
        response_mask = (eos_before == 0).long()
        truncated = ~is_eos.any(-1)
        response_ids = response_ids.masked_fill(response_mask == 0, pad_token_id)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        truncated=truncated,
        sampling_logprobs=logprobs.float() * response_mask if logprobs is not None else None,
    )
