"""PPO's clipped surrogate and clipped value loss (Schulman et al., 1707.06347).

Shape legend:
    N  sequences (prompts x samples)
    T  response tokens (right-padded)
    response_mask  (N, T), 1 on real response tokens

:func:`clipped_surrogate` is the policy loss shared by PPO, GRPO and REINFORCE++; they differ in
their advantages (GAE, group-normalized rewards, whitened KL-shaped returns) and aggregation mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from flowrl.objectives.masked import (
    LOSS_AGG_MODES,
    aggregate_loss,
    apply_mask,
    check_batch_shapes,
    masked_kl_k3,
    masked_mean,
)
from flowrl.objectives.options import Options, check_choice, option

CLIP_EPS = 0.2
"""PPO's ratio clip range epsilon (1707.06347, sec. 6.1, and verl's default)."""

CLIP_RANGE_VALUE = 0.2
"""Clip range of the value prediction around the old one (verl's ``cliprange_value``)."""


def _clip_high(clip_eps: float, clip_eps_high: float | None) -> float:
    """The upper clip range (``clip_eps_high``, or ``clip_eps`` when None), after checking both."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0 < clip_eps < 1 and high > 0):
        raise ValueError(
            f"clip ranges must satisfy 0 < clip_eps < 1 and clip_eps_high > 0, got clip_eps={clip_eps}, "
            f"clip_eps_high={clip_eps_high}"
        )
    return high


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = CLIP_EPS,
    clip_eps_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    normalizer: float | None = None,
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective, negated to a loss (1707.06347, eq. 7).

    Per token, with ``ratio = exp(logprobs - old_logprobs)``:
    ``max(-A ratio, -A clip(ratio, 1 - clip_eps, 1 + clip_eps_high))``, then aggregated with
    ``loss_agg_mode``. ``clip_eps_high`` > ``clip_eps`` is DAPO's "clip-higher" (2503.14476).

    Args:
        logprobs: (N, T) log-probs of the current policy (differentiated).
        old_logprobs: (N, T) log-probs of the policy that sampled the responses.
        advantages: (N, T) per-token advantages, or (N,) one per sequence (broadcast over tokens).
        response_mask: (N, T), 1 on real response tokens.
        clip_eps: lower clip range (and upper, unless ``clip_eps_high`` is given).
        clip_eps_high: upper clip range; defaults to ``clip_eps``.
        loss_agg_mode: see :data:`flowrl.objectives.masked.LOSS_AGG_MODES`.
        normalizer: mini-batch unit count for micro-batching (see ``masked.aggregate_loss``).
        max_response_length: divisor of ``seq-mean-token-sum-norm``; defaults to T.

    Returns:
        ``(loss, metrics)``: a scalar loss; detached scalar metrics ``actor/pg_loss``, ``actor/clip_frac``
        (fraction of real tokens where the clipped term is active), ``actor/ppo_kl`` (KL of the current
        policy from the sampling one per token: the k3 estimate of
        :func:`~flowrl.objectives.masked.masked_kl_k3`, >= 0) and ``actor/ratio`` (masked mean ratio).
        Metrics describe this batch alone, whatever the ``normalizer`` (``actor/pg_loss`` is the loss
        without it).
    """
    per_token_advantages = {"advantages": advantages} if advantages.dim() == 2 else {}
    check_batch_shapes(
        response_mask,
        per_token={"logprobs": logprobs, "old_logprobs": old_logprobs, **per_token_advantages},
        per_sequence={} if per_token_advantages else {"advantages": advantages},
    )
    high = _clip_high(clip_eps, clip_eps_high)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    # Masking the log-ratio (not only the loss) keeps padding out of exp and of the gradient.
    log_ratio = apply_mask(logprobs - old_logprobs, response_mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    aggregate = partial(
        aggregate_loss, mask=response_mask, mode=loss_agg_mode, max_response_length=max_response_length
    )
    loss = aggregate(per_token, normalizer=normalizer)
    metrics = {
        "actor/pg_loss": aggregate(per_token.detach()),
        "actor/clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), response_mask).detach(),
        "actor/ppo_kl": masked_kl_k3(logprobs, old_logprobs, response_mask),
        "actor/ratio": masked_mean(ratio, response_mask).detach(),
    }
    return loss, metrics


ppo_policy_loss = clipped_surrogate
"""PPO's policy loss is the clipped surrogate itself (with GAE advantages, see :func:`gae`)."""


@dataclass(frozen=True)
class PPOLossOptions(Options):
    """The keyword options of :func:`clipped_surrogate` (PPO's policy loss), with its defaults."""

    clip_eps: float = option(clipped_surrogate, "clip_eps", "ratio clip range: [1 - clip_eps, 1 + clip_eps]")
    clip_eps_high: float | None = option(
        clipped_surrogate, "clip_eps_high", "upper clip range (DAPO's clip-higher); null: clip_eps"
    )
    loss_agg_mode: str = option(
        clipped_surrogate,
        "loss_agg_mode",
        f"aggregation over tokens and sequences: {', '.join(LOSS_AGG_MODES)}",
    )
    max_response_length: int | None = option(
        clipped_surrogate,
        "max_response_length",
        "divisor of seq-mean-token-sum-norm; null: the micro-batch's padded response length",
    )

    def __post_init__(self) -> None:
        check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _clip_high(self.clip_eps, self.clip_eps_high)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_range_value: float = CLIP_RANGE_VALUE,
    loss_agg_mode: str = "token-mean",
    normalizer: float | None = None,
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss: ``max((V - R)^2, (V_clip - R)^2) / 2`` per token.

    ``V_clip = old_values + clip(values - old_values, -c, c)`` keeps the critic near its previous
    predictions, as the policy ratio clip does for the actor (the clipped form is from the PPO
    reference implementation, openai/baselines; the paper's eq. 9 uses the plain squared error).

    Args:
        values: (N, T) current critic predictions (differentiated).
        old_values: (N, T) predictions of the critic that scored the rollout.
        returns: (N, T) regression targets (GAE advantages + old values, see :func:`gae`).
        response_mask: (N, T), 1 on real response tokens.
        clip_range_value: c, the clip range around ``old_values``.
        loss_agg_mode: see :data:`flowrl.objectives.masked.LOSS_AGG_MODES`.
        normalizer: mini-batch unit count for micro-batching.
        max_response_length: divisor of ``seq-mean-token-sum-norm``; defaults to T.

    Returns:
        ``(loss, metrics)`` with detached metrics ``critic/vf_loss``, ``critic/vf_clip_frac`` (fraction
        of real tokens where the clipped error is the larger) and ``critic/vpred_mean``.
    """
    check_batch_shapes(
        response_mask, per_token={"values": values, "old_values": old_values, "returns": returns}
    )
    if not clip_range_value > 0:
        raise ValueError(f"clip_range_value must be positive, got {clip_range_value}")
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    aggregate = partial(
        aggregate_loss, mask=response_mask, mode=loss_agg_mode, max_response_length=max_response_length
    )
    loss = aggregate(per_token, normalizer=normalizer)
    metrics = {
        "critic/vf_loss": aggregate(per_token.detach()),
        "critic/vf_clip_frac": masked_mean(
            (clipped_error > unclipped_error).to(values.dtype), response_mask
        ).detach(),
        "critic/vpred_mean": masked_mean(values, response_mask).detach(),
    }
    return loss, metrics
