"""GRPO (Shao et al., 2402.03300) and Dr. GRPO (Liu et al., 2503.20783) policy losses.

Shape legend:
    N  sequences (prompts x samples, contiguous groups of ``num_samples_per_prompt``)
    T  response tokens (right-padded)
    response_mask  (N, T), 1 on real response tokens

Both are PPO's clipped surrogate with a group-normalized outcome advantage per sequence
(:func:`~flowrl.objectives.advantages.group_normalized_rewards`), plus GRPO's optional KL loss to the
reference policy. Dr. GRPO drops the std division in the advantage and the per-sequence length
normalization in the aggregation ("seq-mean-token-sum-norm"). Without the KL loss (``kl_coef=0``) the
reference policy plays no part: pass ``ref_logprobs=None`` and skip computing them; no reference
metric is reported then.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor

from flowrl.objectives.advantages import KL_ESTIMATORS, kl_penalty
from flowrl.objectives.masked import aggregate_loss, apply_mask, check_batch_shapes, masked_kl_k3
from flowrl.objectives.options import check_choice, option
from flowrl.objectives.ppo import CLIP_EPS, PPOLossOptions, clipped_surrogate


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = CLIP_EPS,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg_mode: str = "seq-mean-token-mean",
    normalizer: float | None = None,
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss: clipped surrogate with a per-sequence advantage, plus ``kl_coef`` times a KL loss.

    The KL term is the per-token ``kl_estimator`` estimate of KL(pi || pi_ref) aggregated with the same
    ``loss_agg_mode`` as the surrogate (the paper's eq. 3 uses the k3 estimator, eq. 4, with beta 0.04;
    the default here is 0, i.e. no KL loss, as in DAPO and Dr. GRPO). The paper averages tokens within
    each sequence, then sequences: ``seq-mean-token-mean``.

    Args:
        logprobs: (N, T) log-probs of the current policy (differentiated).
        old_logprobs: (N, T) log-probs of the sampling policy.
        ref_logprobs: (N, T) log-probs of the reference policy, or None when there is none, which
            ``kl_coef=0`` requires (the KL loss needs them).
        advantages: (N,) group-normalized rewards, one per sequence.
        response_mask: (N, T), 1 on real response tokens.
        clip_eps: ratio clip range.
        clip_eps_high: upper clip range (DAPO's clip-higher); defaults to ``clip_eps``.
        kl_coef: weight of the KL loss.
        kl_estimator: one of :data:`~flowrl.objectives.advantages.KL_ESTIMATORS` (k3 in the paper).
        loss_agg_mode: see :data:`~flowrl.objectives.masked.LOSS_AGG_MODES`.
        normalizer: mini-batch unit count for micro-batching.
        max_response_length: divisor of ``seq-mean-token-sum-norm``; defaults to T.

    Returns:
        ``(loss, metrics)``: the surrogate's metrics (``actor/pg_loss``, ``actor/clip_frac``,
        ``actor/ppo_kl``, ``actor/ratio``) plus, only when ``ref_logprobs`` is given, ``actor/kl_loss``
        (the aggregated ``kl_estimator`` term before ``kl_coef``, without the ``normalizer``) and
        ``actor/ref_kl`` (KL of the current policy from the reference per token, the k3 estimate of
        :func:`~flowrl.objectives.masked.masked_kl_k3`, >= 0), all detached.

    Raises:
        ValueError: ``ref_logprobs`` is None while ``kl_coef`` is not 0.
    """
    if ref_logprobs is None and kl_coef != 0:
        raise ValueError(
            f"kl_coef={kl_coef} needs ref_logprobs (the KL loss is to the reference policy), got None: "
            "compute the reference model's log-probs, or set kl_coef=0"
        )
    per_token = {"logprobs": logprobs, "old_logprobs": old_logprobs}
    if ref_logprobs is not None:
        per_token["ref_logprobs"] = ref_logprobs
    check_batch_shapes(response_mask, per_token=per_token, per_sequence={"advantages": advantages})
    loss, metrics = clipped_surrogate(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        loss_agg_mode=loss_agg_mode,
        normalizer=normalizer,
        max_response_length=max_response_length,
    )
    if ref_logprobs is None:
        return loss, metrics  # no reference policy: nothing to report about a KL to it
    # Masked inputs keep padding out of k3's exp and its gradient.
    kl = kl_penalty(
        apply_mask(logprobs, response_mask), apply_mask(ref_logprobs, response_mask), kl_estimator
    )
    aggregate = partial(
        aggregate_loss, mask=response_mask, mode=loss_agg_mode, max_response_length=max_response_length
    )
    if kl_coef != 0:
        loss = loss + kl_coef * aggregate(kl, normalizer=normalizer)
    metrics["actor/kl_loss"] = aggregate(kl.detach())
    metrics["actor/ref_kl"] = masked_kl_k3(logprobs, ref_logprobs, response_mask)
    return loss, metrics


def dr_grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = CLIP_EPS,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg_mode: str = "seq-mean-token-sum-norm",
    normalizer: float | None = None,
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr. GRPO's loss (2503.20783): :func:`grpo_loss` with token sums divided by a constant length.

    Pair it with mean-centred, unscaled advantages (``group_normalized_rewards(..., scale_by_std=False)``).
    Arguments, returns and the ``ref_logprobs=None`` rule (only with ``kl_coef=0``) are those of
    :func:`grpo_loss`; only the default ``loss_agg_mode`` differs.
    Pass ``max_response_length`` (the generation budget) so the divisor does not depend on padding.
    """
    return grpo_loss(
        logprobs,
        old_logprobs,
        ref_logprobs,
        advantages,
        response_mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        loss_agg_mode=loss_agg_mode,
        normalizer=normalizer,
        max_response_length=max_response_length,
    )


@dataclass(frozen=True)
class GRPOLossOptions(PPOLossOptions):
    """The keyword options of :func:`grpo_loss`, with its defaults: the clipped surrogate's and the KL
    loss's."""

    loss_agg_mode: str = option(
        grpo_loss, "loss_agg_mode", "aggregation over tokens and sequences (the paper: seq-mean-token-mean)"
    )
    kl_coef: float = option(
        grpo_loss, "kl_coef", "weight of the KL loss to the reference; 0: none, no reference"
    )
    kl_estimator: str = option(
        grpo_loss, "kl_estimator", f"per-token KL estimate of the KL loss: {', '.join(KL_ESTIMATORS)}"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)


@dataclass(frozen=True)
class DrGRPOLossOptions(GRPOLossOptions):
    """The keyword options of :func:`dr_grpo_loss`: :class:`GRPOLossOptions` with its own aggregation."""

    loss_agg_mode: str = option(
        dr_grpo_loss,
        "loss_agg_mode",
        "aggregation: token sums over a constant length (seq-mean-token-sum-norm, Dr. GRPO's)",
    )
