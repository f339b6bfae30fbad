"""REINFORCE++ policy loss (Hu, 2501.03262).

Shape legend:
    N  sequences (prompts x samples)
    T  response tokens (right-padded)
    response_mask  (N, T), 1 on real response tokens

REINFORCE++ is PPO without a critic: the KL to the reference enters the token rewards, the
return-to-go is whitened over the batch (:func:`~flowrl.objectives.advantages.reinforce_pp_advantages`),
and the policy is updated with PPO's clipped surrogate, averaged over all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from flowrl.objectives.masked import LOSS_AGG_MODES, check_batch_shapes
from flowrl.objectives.options import Options, check_choice, option
from flowrl.objectives.ppo import CLIP_EPS, PPOLossOptions, clipped_surrogate


def reinforce_pp_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = CLIP_EPS,
    loss_agg_mode: str = "token-mean",
    normalizer: float | None = None,
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate on per-token REINFORCE++ advantages.

    Args:
        logprobs: (N, T) log-probs of the current policy (differentiated).
        old_logprobs: (N, T) log-probs of the sampling policy.
        advantages: (N, T) whitened returns from ``reinforce_pp_advantages``.
        response_mask: (N, T), 1 on real response tokens.
        clip_eps: ratio clip range (the paper's 0.2).
        loss_agg_mode: see :data:`~flowrl.objectives.masked.LOSS_AGG_MODES`.
        normalizer: mini-batch unit count for micro-batching.
        max_response_length: divisor of ``seq-mean-token-sum-norm``; defaults to T.

    Returns:
        ``(loss, metrics)`` as :func:`~flowrl.objectives.ppo.clipped_surrogate`.
    """
    check_batch_shapes(response_mask, per_token={"advantages": advantages})
    return clipped_surrogate(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_eps=clip_eps,
        loss_agg_mode=loss_agg_mode,
        normalizer=normalizer,
        max_response_length=max_response_length,
    )


@dataclass(frozen=True)
class ReinforcePPLossOptions(Options):
    """The keyword options of :func:`reinforce_pp_loss`, with its defaults."""

    clip_eps: float = option(reinforce_pp_loss, "clip_eps", PPOLossOptions.help_of("clip_eps"))
    loss_agg_mode: str = option(
        reinforce_pp_loss, "loss_agg_mode", "aggregation over tokens and sequences (REINFORCE++: token-mean)"
    )
    max_response_length: int | None = option(
        reinforce_pp_loss, "max_response_length", PPOLossOptions.help_of("max_response_length")
    )

    def __post_init__(self) -> None:
        check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        PPOLossOptions(clip_eps=self.clip_eps)  # the same clip range check
