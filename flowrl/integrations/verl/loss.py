"""FlowRL's loss in verl: the ``"flowrl"`` policy loss and the engine's loss closure around it.

Shape legend (one micro-batch on one data-parallel rank):
    B  sequences
    T  response tokens (right-padded to the micro-batch's longest response)

verl 0.9 selects a policy loss by name (``actor_rollout_ref.actor.policy_loss.loss_mode``) from
``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``; importing this module registers
:func:`compute_policy_loss_flowrl` there as ``"flowrl"``. It is verl's ``PolicyLossFn`` contract plus
two keyword tensors, because verl's stock closure (``verl.workers.utils.losses.ppo_loss``) never hands a
policy loss the reference log-probs or log Z. :func:`flowrl_actor_loss` is the closure that does: it has
``ppo_loss``'s shape, ``(config, model_output, data, dp_group)``, reads log Z from the model output of
:class:`~flowrl.integrations.verl.engine.FlowRLFSDPEngine` (or, with ``flowrl.log_z.mode=group``, from
the batch, where the driver wrote each uid group's estimate: :func:`group_log_z_by_uid`) and
``ref_log_prob`` from the batch, and the FlowRL trainer installs it on every actor rank with
``set_loss_fn``. The math is
:func:`flowrl.objectives.flowrl_loss`, called once per micro-batch; nothing here recomputes it.

The reduction follows verl's global-batch convention (``core_algos.agg_loss``): each micro-batch's sum
is divided by the global mini-batch's unit count and multiplied by the data-parallel size, because FSDP
averages gradients over the ranks. The micro-batch losses of all ranks then add up to the mean over the
global mini-batch, whatever the micro-batch size, dynamic batching or data-parallel size. verl passes
the counts in the batch: ``global_batch_size`` (sequences of the mini-batch over all ranks, the
``ppo_mini_batch_size x rollout.n`` the trainer sets), ``batch_num_tokens`` (response tokens, all-reduced
over the ranks) and ``dp_size``. The actor's ``loss_agg_mode`` picks FlowRL's per-sequence weighting,
read as verl's ``agg_loss`` would aggregate a loss matrix holding each sequence's ``w * delta**2`` on
every one of its response tokens:

* ``seq-mean-token-mean`` (FlowRL's default): the plain mean over sequences of the length-normalized
  squared residual (``sequence_weighting="mean"``, normalizer ``global_batch_size / dp_size``);
* ``token-mean``: sequences weighted by their response length (``sequence_weighting="length"``, what a
  loss-scaling bug in the reference code did; normalizer ``batch_num_tokens / dp_size``);
* ``seq-mean-token-sum-norm``: sequences weighted by their response length over a constant, the mode of
  verl's ``actor.loss_scale_factor`` (normalizer ``global_batch_size / dp_size * loss_scale_factor``;
  without a factor, verl's default: the micro-batch's padded response length). As in verl, the factor
  applies to this mode alone; :func:`~flowrl.integrations.verl.trainer.check_config` refuses it with
  any other mode, where verl would ignore it silently.

Sequences whose response mask is all zeros (the filler samples verl appends so a batch divides into
mini-batches) are left out of the sum and still count in ``global_batch_size``, as in ``agg_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor
from verl.trainer.ppo.core_algos import get_policy_loss_fn, register_policy_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from flowrl.objectives import flowrl_loss, group_log_z
from flowrl.objectives.flowrl import FlowRLLossOptions
from flowrl.objectives.masked import masked_mean

LOSS_MODE = "flowrl"
"""Name of FlowRL in verl's policy-loss registry (``actor.policy_loss.loss_mode``)."""

SEQUENCE_WEIGHTING = {
    "seq-mean-token-mean": "mean",
    "token-mean": "length",
    "seq-mean-token-sum-norm": "length",
}
"""verl ``loss_agg_mode`` -> ``flowrl_loss(sequence_weighting=...)``; other modes have no FlowRL meaning."""

GROUP_LOG_Z = "flowrl_log_z"
"""Batch field of each sample's log Z under ``flowrl.log_z.mode=group``: written by the driver
(:meth:`flowrl.integrations.verl.trainer.FlowRLTrainerSync._update_actor`) on every response token, as
verl writes ``advantages``, so verl's mini- and micro-batching carry it with the rest of each sample."""

SCALED_MODE = "seq-mean-token-sum-norm"
"""The one ``loss_agg_mode`` verl's ``actor.loss_scale_factor`` applies to (``core_algos.agg_loss``)."""


def loss_kwargs(options: FlowRLLossOptions, loss_agg_mode: str) -> dict[str, Any]:
    """``options`` as :func:`flowrl.objectives.flowrl_loss` keywords, ``sequence_weighting`` from verl's
    ``loss_agg_mode`` (:data:`SEQUENCE_WEIGHTING`): in verl the actor's aggregation mode decides it."""
    return {**options, "sequence_weighting": SEQUENCE_WEIGHTING[loss_agg_mode]}


def sequence_advantages(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """One advantage per sequence from verl's per-token broadcast.

    verl's GRPO estimator writes the group-normalized reward on every response token (zeros on padding);
    the mean over the real tokens is that value (0 for a sequence without response tokens).

    Args:
        advantages: (B, T) per-token advantages.
        response_mask: (B, T), 1 on real response tokens.

    Returns:
        (B,) the sequence's r_hat.
    """
    return masked_mean(advantages, response_mask, dim=-1)


def group_log_z_by_uid(
    uids: Sequence[Any],
    old_log_prob: Tensor,
    ref_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    options: FlowRLLossOptions,
    loss_agg_mode: str = "seq-mean-token-mean",
) -> Tensor:
    """(B,) each sample's log Z under ``flowrl.log_z.mode=group``: :func:`flowrl.objectives.group_log_z`
    over the samples that share its ``uid`` (verl's group of one prompt's ``rollout.n`` responses; the
    batch may be in any order, as verl's ``balance_batch`` leaves it).

    ``ell`` is the old policy's, ``old_log_prob``: the actor before this step's update (or, with
    ``algorithm.rollout_correction.bypass_mode=true``, the rollout's log-probs, which then stand in for
    it), so the weights are 1 and the estimate is the exact minimizer of the first mini-batch's loss;
    for later mini-batches and epochs it is held, like the advantages (a per-prompt baseline, see
    :func:`~flowrl.objectives.group_log_z`). The options and ``loss_agg_mode`` are the loss's, so the
    weights are too. Samples without response tokens (verl's filler samples) are left out of every mean
    and get 0.

    Args:
        uids: (B,) the group id of each sample (any hashable: verl's are strings).
        old_log_prob, ref_log_prob: (B, T) padded per-token log-probs.
        advantages: (B, T) verl's GRPO advantage, broadcast over each response.
        response_mask: (B, T), 1 on real response tokens.
        options: FlowRL's switches.
        loss_agg_mode: the actor's, for the sequence weighting.

    Returns:
        (B,) float32, without gradient history.
    """
    ids: dict[Any, int] = {}
    group_ids = torch.tensor([ids.setdefault(uid, len(ids)) for uid in uids], device=advantages.device)
    mask = response_mask.to(torch.bool)
    return group_log_z(
        old_log_prob,
        old_log_prob,
        ref_log_prob,
        sequence_advantages(advantages, mask),
        mask,
        group_ids=group_ids,
        valid=mask.any(dim=-1),
        **loss_kwargs(options, loss_agg_mode),
    )


def _normalizer(
    loss_agg_mode: str,
    dp_size: int,
    global_batch_size: int | None,
    batch_num_tokens: int | None,
    *,
    num_sequences: int,
    loss_scale_factor: float | None,
    horizon: int,
) -> float | None:
    """This rank's share of the global mini-batch's unit count, times verl's scale factor where it applies.

    None: the local count (only when dp = 1), left to ``flowrl_loss``. ``num_sequences`` (sequences with
    responses) and ``horizon`` (the padded response length) stand in for what ``agg_loss`` reads from
    the micro-batch when the global counts or the factor are absent.
    """
    total = batch_num_tokens if loss_agg_mode == "token-mean" else global_batch_size
    if total is None and dp_size > 1:
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} with dp_size={dp_size} needs the global unit count "
            "(global_batch_size / batch_num_tokens) in the batch; verl's engine sets it when training"
        )
    if loss_agg_mode != SCALED_MODE:
        return None if total is None else float(total) / dp_size
    share = float(num_sequences if total is None else float(total) / dp_size)
    return share * float(horizon if loss_scale_factor is None else loss_scale_factor)


@register_policy_loss(LOSS_MODE)
def compute_policy_loss_flowrl(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
    *,
    ref_log_prob: Tensor | None = None,
    log_z: Tensor | None = None,
    options: FlowRLLossOptions | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """FlowRL's trajectory-balance loss (2509.15207) as a verl policy loss.

    The positional arguments are verl's ``PolicyLossFn`` contract; ``ref_log_prob`` and ``log_z`` are
    required all the same (they default to None only so that a call through verl's stock ``ppo_loss``,
    which cannot pass them, fails with a message that names the fix).

    Args:
        old_log_prob: (B, T) log-probs of the policy that sampled the responses.
        log_prob: (B, T) current log-probs (differentiated).
        advantages: (B, T) verl's per-token advantages; GRPO's group-normalized reward, broadcast.
        response_mask: (B, T), 1 on real response tokens.
        loss_agg_mode: ``"seq-mean-token-mean"``, ``"token-mean"`` or ``"seq-mean-token-sum-norm"`` (see
            the module docstring).
        config: verl's ``ActorConfig``; only ``config.global_batch_info`` is read (``dp_size``,
            ``global_batch_size``, ``batch_num_tokens``, ``loss_scale_factor``, set per micro-batch by the
            closure as ``ppo_loss`` does). None: a local mean (single rank, one micro-batch).
        rollout_is_weights: must be None: FlowRL has its own sequence-level importance weight.
        ref_log_prob: (B, T) log-probs of the reference policy.
        log_z: (B,) log Z of each sequence's prompt, from the partition head (or, in group mode, the
            driver's group estimate, without gradient).
        options: FlowRL's switches; None: the defaults.

    Returns:
        ``(loss, metrics)``: the scalar loss of this micro-batch on the global scale, and the detached
        metrics of :func:`flowrl.objectives.flowrl_loss` (``flowrl/*``, ``actor/ppo_kl``,
        ``actor/ref_kl``; docs/metrics.md) over its sequences with responses.
    """
    if ref_log_prob is None or log_z is None:
        raise ValueError(
            "the 'flowrl' policy loss needs ref_log_prob and log_z, and verl's stock ppo_loss passes "
            "neither: train with trainer.v1.trainer_mode=flowrl_sync (it installs flowrl_actor_loss) and "
            "+actor_rollout_ref.model.model_type=flowrl_language_model (its engine computes log Z), e.g. "
            "through python -m flowrl.integrations.verl.main"
        )
    if rollout_is_weights is not None:
        raise ValueError(
            "token-level rollout importance weights (algorithm.rollout_correction.rollout_is) are unused by "
            "FlowRL, which weights whole sequences (flowrl.importance_weight); set rollout_is=null"
        )
    if loss_agg_mode not in SEQUENCE_WEIGHTING:
        raise ValueError(
            f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode!r} has no FlowRL meaning; use "
            "seq-mean-token-mean (plain mean over sequences), token-mean (weighted by response length) or "
            "seq-mean-token-sum-norm (weighted by length / actor.loss_scale_factor)"
        )
    options = FlowRLLossOptions() if options is None else options
    info = dict(getattr(config, "global_batch_info", None) or {})
    mask = response_mask.to(torch.bool)
    has_response = mask.any(dim=-1)
    if not bool(has_response.any()):
        # Only filler sequences: contribute zero, but keep the graph so that this rank's backward runs.
        return 0.0 * (log_prob.sum() + log_z.sum()), {}
    normalizer = _normalizer(
        loss_agg_mode,
        info.get("dp_size", 1),
        info.get("global_batch_size"),
        info.get("batch_num_tokens"),
        num_sequences=int(has_response.sum()),
        loss_scale_factor=info.get("loss_scale_factor"),
        horizon=mask.shape[-1],
    )
    r_hat = sequence_advantages(advantages, mask)
    kept = [t[has_response] for t in (log_prob, old_log_prob, ref_log_prob, log_z, r_hat, mask)]
    return flowrl_loss(*kept, **loss_kwargs(options, loss_agg_mode), normalizer=normalizer)


def flowrl_actor_loss(
    config: Any,
    model_output: dict[str, Tensor],
    data: TensorDict,
    dp_group: Any = None,
    *,
    options: FlowRLLossOptions,
) -> tuple[Tensor, dict[str, Metric]]:
    """The actor's loss closure for verl's engine: ``ppo_loss``'s shape, FlowRL's inputs.

    Install it with ``actor_rollout_ref_wg.set_loss_fn(functools.partial(flowrl_actor_loss,
    config=actor_config, options=options))`` (the FlowRL trainer does). The engine calls it per
    micro-batch as ``loss_fn(model_output=..., data=..., dp_group=...)``.

    Args:
        config: verl's ``ActorConfig`` of the actor (``policy_loss.loss_mode`` must be ``"flowrl"``;
            ``loss_agg_mode``, ``loss_scale_factor``; ``global_batch_info`` is updated here, as
            ``ppo_loss`` does).
        model_output: the engine's outputs: nested ``log_probs`` (B, prompt + response) and ``log_z`` (B,)
            (``log_z`` only with the head, ``flowrl.log_z.mode=head``).
        data: the micro-batch TensorDict: nested ``response_mask``, ``old_log_probs``, ``advantages``,
            ``ref_log_prob``, ``prompts``/``responses`` for the layout, in group mode
            :data:`GROUP_LOG_Z` (each sample's log Z on its response tokens), and the non-tensor
            ``dp_size``, ``global_batch_size``, ``batch_num_tokens``.
        dp_group: unused (the global counts come in ``data``).
        options: FlowRL's switches.

    Returns:
        ``(loss, metrics)`` as verl expects: the metrics of :func:`flowrl.objectives.flowrl_loss`
        (``flowrl/*``, ``actor/ppo_kl``, ``actor/ref_kl``; averaged over micro-batches and ranks). The
        loss itself is not among them: verl's engine logs every loss closure's value, summed over the
        micro-batches, as ``loss`` (``actor/loss`` once the trainer prefixes it), the project's
        ``actor/loss``. ``ppo_loss`` reports its policy-gradient part as ``actor/pg_loss`` too; FlowRL's
        loss has no such part apart from the whole, and a second name for it would only mislead.
    """
    loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    if loss_mode != LOSS_MODE:
        raise ValueError(
            "flowrl_actor_loss is installed, but actor_rollout_ref.actor.policy_loss.loss_mode="
            f"{loss_mode!r}: set it to {LOSS_MODE!r}"
        )
    group = GROUP_LOG_Z in data.keys()  # flowrl.log_z.mode=group: the driver's estimate, no head
    if "log_z" not in model_output and not group:
        raise ValueError(
            "the model output has no log_z and the batch no flowrl_log_z: set "
            "+actor_rollout_ref.model.model_type=flowrl_language_model so that the actor runs on "
            "FlowRLFSDPEngine, which computes log Z in training passes (flowrl.log_z.mode=head), or train "
            "with trainer.v1.trainer_mode=flowrl_sync, whose driver writes the group estimate into the "
            "batch (flowrl.log_z.mode=group)"
        )
    if "ref_log_prob" not in data.keys():
        raise ValueError(
            "the batch has no ref_log_prob: FlowRL always needs the reference policy; set "
            "actor_rollout_ref.actor.use_kl_loss=true (with kl_loss_coef=0: FlowRL adds no KL term)"
        )
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    dp_size = tu.get_non_tensor_data(data, "dp_size", 1)
    batch_num_tokens = tu.get_non_tensor_data(data, "batch_num_tokens", None)
    global_batch_size = tu.get_non_tensor_data(data, "global_batch_size", None)
    config.global_batch_info.update(
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=config.loss_scale_factor,  # as ppo_loss hands it to agg_loss
    )
    fields = ["response_mask", "old_log_probs", "advantages", "ref_log_prob"] + (
        [GROUP_LOG_Z] if group else []
    )
    padded = data.select(*fields).to_padded_tensor()
    # group mode: the driver wrote each sample's value on every response position; the first is exact
    log_z = padded[GROUP_LOG_Z][:, 0] if group else model_output["log_z"]
    loss, metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=padded["old_log_probs"],
        log_prob=log_prob,
        advantages=padded["advantages"],
        response_mask=padded["response_mask"],
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        ref_log_prob=padded["ref_log_prob"],
        log_z=log_z,
        options=options,
    )
    return loss, Metric.from_dict(metrics, aggregation=AggregationType.MEAN)
