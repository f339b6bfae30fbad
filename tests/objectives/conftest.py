"""Shared random batches for the objective tests (float64, right-padded, NaN in the padding)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

PAD_GARBAGE = float("nan")
"""What padded positions hold: NaN reaches a result or a gradient if any masking is missing."""


def _make_batch(
    num_prompts: int = 3,
    num_samples_per_prompt: int = 4,
    max_length: int = 6,
    seed: int = 0,
    off_policy_scale: float = 0.3,
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = num_prompts * num_samples_per_prompt
    lengths = torch.randint(1, max_length + 1, (n,), generator=generator)
    lengths[0] = max_length  # at least one full-length response, so T is the longest
    response_mask = torch.arange(max_length).unsqueeze(0) < lengths.unsqueeze(1)

    def per_token(values: torch.Tensor) -> torch.Tensor:
        return torch.where(response_mask, values, PAD_GARBAGE)

    logprobs = -torch.rand(n, max_length, generator=generator, dtype=torch.float64) * 3
    old_logprobs = logprobs + off_policy_scale * torch.randn(
        n, max_length, generator=generator, dtype=torch.float64
    )
    ref_logprobs = logprobs + 0.5 * torch.randn(n, max_length, generator=generator, dtype=torch.float64)
    return {
        "logprobs": per_token(logprobs).requires_grad_(),
        "old_logprobs": per_token(old_logprobs),
        "ref_logprobs": per_token(ref_logprobs),
        "response_mask": response_mask,
        "rewards": torch.randint(0, 2, (n,), generator=generator).to(torch.float64),
        "log_z": torch.randn(n, generator=generator, dtype=torch.float64).requires_grad_(),
        "lengths": lengths,
    }


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: ``make_batch(num_prompts, num_samples_per_prompt, max_length, seed, off_policy_scale)``."""
    return _make_batch
