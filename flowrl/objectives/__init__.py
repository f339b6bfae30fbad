"""The objectives: FlowRL and its baselines as pure tensor functions, and a plain dict of them.

Shape legend:
    N  sequences (prompts x samples, contiguous groups of ``num_samples_per_prompt``)
    T  response tokens (right-padded)
    response_mask  (N, T), 1 on real response tokens

Each :class:`Objective` bundles a loss, the advantage estimator it expects and what the trainer must
provide. The trainer calls::

    advantages = objective.advantage_fn(rewards, response_mask, old_logprobs, ref_logprobs,
                                        num_samples_per_prompt=n, **advantage_kwargs)
    normalizer = sum(objective.count_units(micro.response_mask, **loss_kwargs) for micro in mini_batch)
    loss, metrics = objective.loss_fn(logprobs=..., old_logprobs=..., advantages=..., response_mask=...,
                                      [ref_logprobs=...,] [log_z=...,] normalizer=normalizer, **loss_kwargs)

and the micro-batch losses add up to the loss of the whole mini-batch. ``loss_kwargs`` and
``advantage_kwargs`` are instances of ``objective.loss_options`` and ``objective.advantage_options``
(:mod:`flowrl.objectives.options`): typed dataclasses of the functions' keyword options with their
defaults, defined next to each function, and mappings, so ``**`` passes them; they are the config's
``algorithm.loss`` and ``algorithm.advantage``. For an objective that takes
``log_z``, the trainer's ``log_z.mode`` says where it comes from: a partition head (``"head"``, the
policy's forward returns it) or, with ``"group"``, ``objective.group_log_z_fn`` computed once per step
before the update, from the log-probs without gradient, and passed per sequence like the advantages.

``metrics`` holds detached scalars named as in docs/metrics.md: the shared ``actor/`` names
(``actor/ppo_kl``, ``actor/ref_kl``, ``actor/pg_loss``, ...) mean the same quantity in every objective,
``flowrl/`` ones are FlowRL's own. A metric is only reported for what was computed: no
``actor/ref_kl`` without reference log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flowrl.objectives.advantages import (
    KL_ESTIMATORS,
    GroupAdvantageOptions,
    ReinforcePPAdvantageOptions,
    gae,
    group_normalized_rewards,
    kl_penalty,
    reinforce_pp_advantages,
)
from flowrl.objectives.flowrl import (
    IMPORTANCE_WEIGHT_MODES,
    LOG_Z_MODE,
    LOG_Z_MODES,
    REFERENCES,
    SEQUENCE_WEIGHTINGS,
    FlowRLLossOptions,
    flowrl_loss,
    group_log_z,
    group_log_z_terms,
    importance_weight_clipped,
    sequence_importance_weight,
    weighted_mean_by_group,
)
from flowrl.objectives.grpo import DrGRPOLossOptions, GRPOLossOptions, dr_grpo_loss, grpo_loss
from flowrl.objectives.masked import (
    LOSS_AGG_MODES,
    aggregate_loss,
    count_units,
    kl_k3,
    masked_kl_k3,
    masked_mean,
    masked_sum,
    masked_whiten,
    mean_over_sequences,
)
from flowrl.objectives.options import NoOptions, Options, default_of
from flowrl.objectives.ppo import PPOLossOptions, clipped_surrogate, ppo_policy_loss, value_loss
from flowrl.objectives.reinforce_pp import ReinforcePPLossOptions, reinforce_pp_loss

LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Objective:
    """A policy objective and what the trainer must feed it."""

    name: str
    """Key in :data:`OBJECTIVES` and the ``objective`` config value."""
    loss_fn: LossFn
    """Keyword tensors (``logprobs``, ``old_logprobs``, ``advantages``, ``response_mask``, plus the ones
    flagged below) and hyperparameters in; ``(loss, metrics)`` out."""
    advantage_fn: Callable[..., Tensor]
    """``advantage_fn(rewards, response_mask, old_logprobs, ref_logprobs, *, num_samples_per_prompt,
    valid=None, **advantage_kwargs)``: (N,) per-sequence or (N, T) per-token advantages, without
    gradient. ``valid`` (N,) bool marks the responses whose reward was computed; the others are left
    out of the statistics and get 0. Its options are keyword-only arguments with defaults."""
    uses_log_z: bool
    """``loss_fn`` takes ``log_z`` (N,): the trainer needs a partition head."""
    uses_ref_logprobs: bool
    """``loss_fn`` takes ``ref_logprobs`` (N, T) (see ``ref_logprobs_only_for_kl`` for when it may be
    None)."""
    needs_values: bool
    """Needs a critic (PPO); the LM trainer has none and refuses the objective."""
    count_units: Callable[..., float]
    """``count_units(response_mask, **loss_kwargs)``: the local number of units the loss averages over
    (tokens, sequences, or the summed sequence lengths of FlowRL's ``sequence_weighting="length"``).
    Summed over a mini-batch, it is the ``normalizer`` to pass to every micro-batch."""
    advantage_uses_ref_logprobs: bool = False
    """``advantage_fn`` reads ``ref_logprobs`` (REINFORCE++ puts the KL into the reward), so the trainer
    must compute them even when ``uses_ref_logprobs`` is False."""
    ref_logprobs_only_for_kl: bool = False
    """``loss_fn`` reads ``ref_logprobs`` only for its ``kl_coef``-weighted KL term and the
    ``actor/kl_loss`` / ``actor/ref_kl`` metrics (GRPO, Dr. GRPO): at ``kl_coef=0`` the trainer skips the
    reference model and passes ``ref_logprobs=None`` (never a stand-in, whose KL would be logged as if
    real), and those metrics are left out. With ``kl_coef != 0``, None raises a ValueError."""
    loss_options: type[Options] = NoOptions
    """The dataclass of ``loss_fn``'s options (``algorithm.loss``), with its defaults."""
    advantage_options: type[Options] = NoOptions
    """The dataclass of ``advantage_fn``'s options (``algorithm.advantage``), with its defaults."""
    needs_groups: bool = True
    """The objective compares the samples of one prompt (group-normalized rewards, FlowRL's log Z), so a
    run needs ``num_samples_per_prompt >= 2``; REINFORCE++ whitens over the whole batch instead."""
    group_log_z_fn: Callable[..., Tensor] | None = None
    """For an objective with ``uses_log_z``: the group estimate that replaces the head under
    ``log_z.mode="group"``, ``group_log_z_fn(logprobs, old_logprobs, ref_logprobs, advantages,
    response_mask, *, num_samples_per_prompt, valid, **loss_kwargs)`` -> (N,) without gradient (it takes
    the loss's own options, so its weights are the loss's)."""

    def needs_log_z_head(self, log_z_mode: str) -> bool:
        """Whether a run in ``log_z_mode`` builds, trains, saves and exports a partition head."""
        if log_z_mode not in LOG_Z_MODES:
            raise ValueError(f"log_z.mode={log_z_mode!r} is not one of {', '.join(LOG_Z_MODES)}")
        return self.uses_log_z and log_z_mode == "head"


def _units_by_agg_mode(loss_fn: LossFn) -> Callable[..., float]:
    """``count_units`` for a loss aggregated with ``loss_agg_mode`` (default: the loss's own)."""
    default_mode = default_of(loss_fn, "loss_agg_mode")

    def units(response_mask: Tensor, *, loss_agg_mode: str = default_mode, **_loss_kwargs: Any) -> float:
        return count_units(response_mask, loss_agg_mode)

    return units


def _flowrl_units(
    response_mask: Tensor,
    *,
    sequence_weighting: str = default_of(flowrl_loss, "sequence_weighting"),
    **_loss_kwargs: Any,
) -> float:
    # Length weighting divides by the summed lengths, i.e. the token count; the plain mean by N.
    return count_units(
        response_mask, "token-mean" if sequence_weighting == "length" else "seq-mean-token-mean"
    )


# The advantage functions spell out their options (no **kwargs) so a config can be checked against them.


def _group_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    *,
    num_samples_per_prompt: int,
    eps: float = default_of(group_normalized_rewards, "eps"),
    valid: Tensor | None = None,
) -> Tensor:
    """GRPO's group-normalized rewards (FlowRL's r_hat); see :func:`group_normalized_rewards`."""
    return group_normalized_rewards(rewards, num_samples_per_prompt, eps, valid=valid)


def _dr_grpo_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    *,
    num_samples_per_prompt: int,
    valid: Tensor | None = None,
) -> Tensor:
    """Dr. GRPO's advantage: rewards minus the group mean, not divided by the group std (2503.20783)."""
    return group_normalized_rewards(rewards, num_samples_per_prompt, scale_by_std=False, valid=valid)


def _reinforce_pp_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    num_samples_per_prompt: int,
    kl_coef: float = default_of(reinforce_pp_advantages, "kl_coef"),
    kl_estimator: str = default_of(reinforce_pp_advantages, "kl_estimator"),
    valid: Tensor | None = None,
) -> Tensor:
    """REINFORCE++ advantages; groups play no part (the whole batch is whitened)."""
    return reinforce_pp_advantages(
        rewards,
        response_mask,
        old_logprobs,
        ref_logprobs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        valid=valid,
    )


def _ppo_advantages(*args: Any, **kwargs: Any) -> Tensor:
    raise ValueError(
        "PPO needs a value model: its advantages come from a critic's values through "
        "flowrl.objectives.gae(token_rewards, values, response_mask), which this trainer does not train. "
        "Use objective 'flowrl', 'grpo', 'dr_grpo' or 'reinforce_pp', or call gae and ppo_policy_loss "
        "directly with your own critic."
    )


OBJECTIVES: dict[str, Objective] = {
    "flowrl": Objective(
        name="flowrl",
        loss_fn=flowrl_loss,
        advantage_fn=_group_advantages,
        uses_log_z=True,
        uses_ref_logprobs=True,
        needs_values=False,
        count_units=_flowrl_units,
        loss_options=FlowRLLossOptions,
        advantage_options=GroupAdvantageOptions,
        group_log_z_fn=group_log_z,
    ),
    "grpo": Objective(
        name="grpo",
        loss_fn=grpo_loss,
        advantage_fn=_group_advantages,
        uses_log_z=False,
        uses_ref_logprobs=True,
        needs_values=False,
        count_units=_units_by_agg_mode(grpo_loss),
        ref_logprobs_only_for_kl=True,
        loss_options=GRPOLossOptions,
        advantage_options=GroupAdvantageOptions,
    ),
    "dr_grpo": Objective(
        name="dr_grpo",
        loss_fn=dr_grpo_loss,
        advantage_fn=_dr_grpo_advantages,
        uses_log_z=False,
        uses_ref_logprobs=True,
        needs_values=False,
        count_units=_units_by_agg_mode(dr_grpo_loss),
        ref_logprobs_only_for_kl=True,
        loss_options=DrGRPOLossOptions,
    ),
    "reinforce_pp": Objective(
        name="reinforce_pp",
        loss_fn=reinforce_pp_loss,
        advantage_fn=_reinforce_pp_advantages,
        uses_log_z=False,
        uses_ref_logprobs=False,
        needs_values=False,
        count_units=_units_by_agg_mode(reinforce_pp_loss),
        advantage_uses_ref_logprobs=True,
        loss_options=ReinforcePPLossOptions,
        advantage_options=ReinforcePPAdvantageOptions,
        needs_groups=False,
    ),
    "ppo": Objective(
        name="ppo",
        loss_fn=ppo_policy_loss,
        advantage_fn=_ppo_advantages,
        uses_log_z=False,
        uses_ref_logprobs=False,
        needs_values=True,
        count_units=_units_by_agg_mode(ppo_policy_loss),
        loss_options=PPOLossOptions,
        needs_groups=False,
    ),
}
"""Every objective by name. Only "ppo" has ``needs_values``."""

__all__ = [
    "IMPORTANCE_WEIGHT_MODES",
    "KL_ESTIMATORS",
    "LOG_Z_MODE",
    "LOG_Z_MODES",
    "LOSS_AGG_MODES",
    "OBJECTIVES",
    "REFERENCES",
    "SEQUENCE_WEIGHTINGS",
    "DrGRPOLossOptions",
    "FlowRLLossOptions",
    "GRPOLossOptions",
    "GroupAdvantageOptions",
    "NoOptions",
    "Objective",
    "Options",
    "PPOLossOptions",
    "ReinforcePPAdvantageOptions",
    "ReinforcePPLossOptions",
    "aggregate_loss",
    "clipped_surrogate",
    "count_units",
    "dr_grpo_loss",
    "flowrl_loss",
    "gae",
    "group_log_z",
    "group_log_z_terms",
    "group_normalized_rewards",
    "grpo_loss",
    "importance_weight_clipped",
    "kl_k3",
    "kl_penalty",
    "masked_kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "mean_over_sequences",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_loss",
    "sequence_importance_weight",
    "value_loss",
    "weighted_mean_by_group",
]
