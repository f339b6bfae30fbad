"""The rollout interface. Shape legend: N = prompts x n sequences (the n samples of one prompt are
contiguous), P prompt tokens (left-padded), T response tokens (right-padded)."""

from __future__ import annotations

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

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses for each prompt (token ids, no padding)."""
        ...

    def sync_weights(self, policy_model: nn.Module) -> None:
        """Make the engine sample from the policy's current weights (the log Z head is never sent)."""
        ...
