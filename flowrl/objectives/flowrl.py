"""The FlowRL loss (Zhu et al., "FlowRL: Matching Reward Distributions for LLM Reasoning", 2509.15207).

Shape legend:
    N  sequences (prompts x samples, contiguous groups of ``num_samples_per_prompt``)
    T  response tokens (right-padded)
    response_mask  (N, T), 1 on real response tokens

FlowRL fits the policy to the target ``p*(y|x) = exp(beta r_hat(x, y)) pi_ref(y|x) / Z(x)``. Minimizing
KL(pi || p*) is, in gradient, the trajectory-balance loss of GFlowNets: a squared residual between
``log Z(x) + log pi(y|x)`` and ``beta r_hat + log pi_ref(y|x)``, with length-normalized log-probs and a
sequence-level importance weight for off-policy samples. The switches below are the choices on which
the paper, its reference code and the verl recipe differ (docs/algorithm.md#3-switches, each with its source).

``log Z(x)`` comes from one of two places (``log_z.mode`` in the trainer's config):

* ``head``: a learned partition head on the prompt's hidden states (the paper's);
* ``group``: :func:`group_log_z`, the value that minimizes the loss of each prompt's group of n
  samples, the importance-weighted group mean of ``beta r_hat + ell_ref - ell``. The loss becomes the
  weighted variance of ``ell - ell_ref - beta r_hat`` within each group (VarGrad, Richter et al. 2020,
  arXiv 2010.10436; used for GFlowNets as a partition-free objective, e.g. Malkin et al. 2023,
  arXiv 2210.00580); no head is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.objectives.masked import (
    check_batch_shapes,
    masked_kl_k3,
    masked_mean,
    masked_sum,
    mean_over_sequences,
    sequence_lengths,
)
from flowrl.objectives.options import Options, check_choice, option

BETA = 15.0
"""Inverse temperature of the target distribution (the paper's value, hard-coded in its code)."""

MAX_IMPORTANCE_WEIGHT = 10.0
"""Cap of the ``"clamp"`` importance weight (the authors' later default and the verl recipe's)."""

CLIP_EPS = 0.2
"""Half-width of the ``"clip"`` importance-weight interval [1 - eps, 1 + eps] (the paper's text)."""

IMPORTANCE_WEIGHT_MODES = ("clamp", "clip", "none", "on_policy")
"""``clamp``: min(exp(log_w), max) (default); ``clip``: clip(exp(log_w), 1 - eps, 1 + eps) (the paper);
``none``: exp(log_w), unbounded (the code behind the paper's numbers); ``on_policy``: 1."""

REFERENCES = ("ref", "old")
"""The policy in the residual: pi_ref (the paper) or pi_old (an ablation the authors tried)."""

SEQUENCE_WEIGHTINGS = ("mean", "length")
"""``mean``: plain mean over sequences (default); ``length``: weighted by response length (what a
loss-scaling bug in the reference code did)."""


def _log_weight_bounds(
    mode: str, max_importance_weight: float, clip_eps: float
) -> tuple[float | None, float | None]:
    """The interval ``(low, high)`` that ``mode`` clamps ``log_w`` to; None for an open side."""
    check_choice("importance_weight", mode, IMPORTANCE_WEIGHT_MODES)
    if mode == "clamp":
        if not max_importance_weight > 0:
            raise ValueError(f"max_importance_weight must be positive, got {max_importance_weight}")
        return None, math.log(max_importance_weight)
    if mode == "clip":
        if not 0 < clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1) for importance_weight='clip', got {clip_eps}")
        return math.log1p(-clip_eps), math.log1p(clip_eps)
    return None, None


def sequence_importance_weight(
    log_w: Tensor,
    mode: str,
    *,
    max_importance_weight: float = MAX_IMPORTANCE_WEIGHT,
    clip_eps: float = CLIP_EPS,
) -> Tensor:
    """Sequence-level importance weight ``w`` from the log-ratio ``log_w``, detached.

    Computed in log space where it is bounded, so no mode but ``"none"`` can overflow.

    Args:
        log_w: (N,) ``sum_t (logprobs - old_logprobs)`` over each response's tokens.
        mode: one of :data:`IMPORTANCE_WEIGHT_MODES`.
        max_importance_weight: the cap of ``"clamp"``.
        clip_eps: the interval half-width of ``"clip"``.

    Returns:
        (N,) weights without gradient history.
    """
    low, high = _log_weight_bounds(mode, max_importance_weight, clip_eps)
    log_w = log_w.detach()
    if mode == "on_policy":
        return torch.ones_like(log_w)
    return torch.exp(torch.clamp(log_w, min=low, max=high) if mode != "none" else log_w)


def importance_weight_clipped(
    log_w: Tensor,
    mode: str,
    *,
    max_importance_weight: float = MAX_IMPORTANCE_WEIGHT,
    clip_eps: float = CLIP_EPS,
) -> Tensor:
    """Which sequences' weight the ``"clamp"`` cap or the ``"clip"`` interval changed.

    ``log_w`` strictly outside the mode's bounds (a weight exactly at the cap is unchanged). ``"none"``
    bounds nothing and ``"on_policy"`` ignores ``log_w`` altogether, so both give all False.

    Args:
        log_w: (N,) ``sum_t (logprobs - old_logprobs)`` over each response's tokens.
        mode: one of :data:`IMPORTANCE_WEIGHT_MODES`.
        max_importance_weight: the cap of ``"clamp"``.
        clip_eps: the interval half-width of ``"clip"``.

    Returns:
        (N,) bool.
    """
    low, high = _log_weight_bounds(mode, max_importance_weight, clip_eps)
    log_w = log_w.detach()
    clipped = torch.zeros_like(log_w, dtype=torch.bool)
    if low is not None:
        clipped |= log_w < low
    if high is not None:
        clipped |= log_w > high
    return clipped


@dataclass(frozen=True)
class _SequenceTerms:
    """The per-sequence quantities that the loss and the group estimate of log Z share, all (N,)."""

    ell: Tensor  # length-normalized log pi(y|x) of the policy being trained
    ell_old: Tensor  # of the policy that sampled
    ell_ref: Tensor  # of the reference
    baseline: Tensor  # what the residual subtracts besides beta r_hat: ell_ref, or ell_old (reference="old")
    log_w: Tensor  # log of the sequence importance ratio, detached
    weight: Tensor  # the importance weight w (stop-gradient)
    lengths: Tensor | None  # |y| for sequence_weighting="length", else None


def _sequence_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    per_sequence: dict[str, Tensor],
    importance_weight: str,
    max_importance_weight: float,
    clip_eps: float,
    reference: str,
    sequence_weighting: str,
) -> _SequenceTerms:
    """Check the switches and shapes, then reduce the (N, T) log-probs to :class:`_SequenceTerms`."""
    check_choice("reference", reference, REFERENCES)
    check_choice("sequence_weighting", sequence_weighting, SEQUENCE_WEIGHTINGS)
    check_batch_shapes(
        response_mask,
        per_token={"logprobs": logprobs, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs},
        per_sequence=per_sequence,
    )
    ell = masked_mean(logprobs, response_mask, dim=-1)
    ell_old = masked_mean(old_logprobs, response_mask, dim=-1)
    ell_ref = masked_mean(ref_logprobs, response_mask, dim=-1)
    log_w = masked_sum(logprobs.detach() - old_logprobs.detach(), response_mask, dim=-1)
    bounds = dict(max_importance_weight=max_importance_weight, clip_eps=clip_eps)
    return _SequenceTerms(
        ell=ell,
        ell_old=ell_old,
        ell_ref=ell_ref,
        baseline=ell_ref if reference == "ref" else ell_old,
        log_w=log_w,
        weight=sequence_importance_weight(log_w, importance_weight, **bounds),
        lengths=sequence_lengths(response_mask) if sequence_weighting == "length" else None,
    )


def _mean_exp(log_w: Tensor) -> Tensor:
    """mean(exp(log_w)) through a log-sum-exp, saturating at the dtype's largest finite value."""
    log_mean = torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
    return torch.exp(torch.clamp(log_mean, max=math.log(torch.finfo(log_w.dtype).max)))


def flowrl_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    log_z: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    beta: float = BETA,
    importance_weight: str = "clamp",
    max_importance_weight: float = MAX_IMPORTANCE_WEIGHT,
    clip_eps: float = CLIP_EPS,
    reference: str = "ref",
    sequence_weighting: str = "mean",
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """FlowRL's trajectory-balance loss (2509.15207), with the switches of its reference code.

    Per response::

        ell     = masked_mean_t(logprobs)            # length-normalized log pi(y|x)
        ell_ref = masked_mean_t(ref_logprobs)        # or of old_logprobs when reference="old"
        delta   = log_z + ell - beta * advantages - ell_ref
        log_w   = masked_sum_t(logprobs - old_logprobs)
        w       = stop_gradient(importance_weight(log_w))
        loss    = mean over sequences of w * delta**2

    The gradient reaches the policy through ``ell`` and through ``log_z`` (which the caller computes
    from the policy's hidden states; it is never detached here), and the partition head through
    ``log_z``. ``d loss / d log_z_i = 2 w_i delta_i / N``.

    Args:
        logprobs: (N, T) log-probs of the current policy at temperature-scaled logits (differentiated).
        old_logprobs: (N, T) log-probs of the policy that sampled the responses.
        ref_logprobs: (N, T) log-probs of the reference policy.
        log_z: (N,) log Z(x) of each response's prompt, from the partition head.
        advantages: (N,) the reward term multiplied by ``beta``: group-normalized rewards in the trainer
            (the paper's r_hat), the raw log-density reward in the toy. Treated as a constant.
        response_mask: (N, T), 1 on real response tokens.
        beta: inverse temperature of the target distribution.
        importance_weight: one of :data:`IMPORTANCE_WEIGHT_MODES`.
        max_importance_weight: cap of the ``"clamp"`` weight.
        clip_eps: half-width of the ``"clip"`` interval.
        reference: one of :data:`REFERENCES`.
        sequence_weighting: one of :data:`SEQUENCE_WEIGHTINGS`; ``"length"`` gives
            ``sum(len w delta^2) / sum(len)``.
        normalizer: when given, the (weighted) sum is divided by it instead of by N (or by the total
            length): the mini-batch's unit count, so micro-batch losses add up to the mini-batch loss.

    Returns:
        ``(loss, metrics)``: a scalar loss and detached scalar metrics (docs/metrics.md), means over
        sequences unless noted: ``flowrl/ell``, ``flowrl/ell_old``, ``flowrl/ell_ref`` (always of
        ``ref_logprobs``), ``flowrl/log_z``, ``flowrl/r_hat_abs`` (mean ``|advantages|``),
        ``flowrl/residual`` (delta), ``flowrl/residual_abs``, ``flowrl/importance_weight_raw``
        (mean exp(log_w), saturating instead of overflowing), ``flowrl/importance_weight`` (mean w),
        ``flowrl/importance_weight_clipped_frac`` (share of sequences whose weight the clamp or clip
        changed, see :func:`importance_weight_clipped`), and, per token over all real tokens, the k3
        estimates (:func:`~flowrl.objectives.masked.masked_kl_k3`, >= 0) ``actor/ppo_kl`` (KL of the
        current policy from the sampling one) and ``actor/ref_kl`` (from the reference). Metrics
        describe this batch alone, whatever the ``normalizer``, so micro-batch metrics average,
        weighted by their sizes. The loss itself is not among them: it is what the caller
        backpropagates and logs (``actor/loss`` in the trainer).
    """
    s = _sequence_terms(
        logprobs,
        old_logprobs,
        ref_logprobs,
        response_mask,
        per_sequence={"log_z": log_z, "advantages": advantages},
        importance_weight=importance_weight,
        max_importance_weight=max_importance_weight,
        clip_eps=clip_eps,
        reference=reference,
        sequence_weighting=sequence_weighting,
    )
    residual = log_z + s.ell - beta * advantages - s.baseline
    bounds = dict(max_importance_weight=max_importance_weight, clip_eps=clip_eps)
    clipped = importance_weight_clipped(s.log_w, importance_weight, **bounds)
    loss = mean_over_sequences(s.weight * residual.square(), normalizer=normalizer, weights=s.lengths)

    metrics = {
        "flowrl/ell": s.ell.mean(),
        "flowrl/ell_old": s.ell_old.mean(),
        "flowrl/ell_ref": s.ell_ref.mean(),
        "flowrl/log_z": log_z.mean(),
        # Not the mean of r_hat: group normalization makes it 0 in every group by construction, so it
        # would say nothing. Its magnitude does: 0 when every group's rewards are equal (no signal).
        "flowrl/r_hat_abs": advantages.abs().mean(),
        "flowrl/residual": residual.mean(),
        "flowrl/residual_abs": residual.abs().mean(),
        "flowrl/importance_weight_raw": _mean_exp(s.log_w),
        "flowrl/importance_weight": s.weight.mean(),
        "flowrl/importance_weight_clipped_frac": clipped.to(s.weight.dtype).mean(),
        "actor/ppo_kl": masked_kl_k3(logprobs, old_logprobs, response_mask),
        "actor/ref_kl": masked_kl_k3(logprobs, ref_logprobs, response_mask),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


@dataclass(frozen=True)
class FlowRLLossOptions(Options):
    """FlowRL's loss switches: the keyword options of :func:`flowrl_loss` (and of :func:`group_log_z`,
    whose weights must be the loss's), with its defaults (docs/algorithm.md#3-switches)."""

    beta: float = option(
        flowrl_loss, "beta", "inverse temperature of the target exp(beta r_hat) pi_ref / Z (the paper's 15)"
    )
    importance_weight: str = option(
        flowrl_loss,
        "importance_weight",
        "sequence importance weight: clamp min(w, max_importance_weight) (the authors' later default), "
        "clip [1 - clip_eps, 1 + clip_eps] (the paper's text), none (unbounded), on_policy (1)",
    )
    max_importance_weight: float = option(flowrl_loss, "max_importance_weight", "cap of the clamp weight")
    clip_eps: float = option(flowrl_loss, "clip_eps", "half-width of the clip weight's interval")
    reference: str = option(
        flowrl_loss, "reference", "policy in the residual: ref (pi_ref, the paper) or old (an ablation)"
    )
    sequence_weighting: str = option(
        flowrl_loss,
        "sequence_weighting",
        "mean (plain mean over sequences) or length (weighted by response length: the reference code's "
        "loss-scaling bug)",
    )

    def __post_init__(self) -> None:
        _log_weight_bounds(self.importance_weight, self.max_importance_weight, self.clip_eps)
        check_choice("reference", self.reference, REFERENCES)
        check_choice("sequence_weighting", self.sequence_weighting, SEQUENCE_WEIGHTINGS)


LOG_Z_MODES = ("head", "group")
"""Where ``log Z(x)`` comes from: ``head``, a learned partition head (the paper); ``group``, the group
estimate of :func:`group_log_z` (no head)."""

LOG_Z_MODE = LOG_Z_MODES[0]
"""The default: the paper's partition head."""


def group_log_z(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    num_samples_per_prompt: int | None = None,
    group_ids: Tensor | None = None,
    valid: Tensor | None = None,
    beta: float = BETA,
    importance_weight: str = "clamp",
    max_importance_weight: float = MAX_IMPORTANCE_WEIGHT,
    clip_eps: float = CLIP_EPS,
    reference: str = "ref",
    sequence_weighting: str = "mean",
) -> Tensor:
    """The log Z(x) that minimizes each group's FlowRL loss: a group mean instead of a partition head.

    For the n samples of one prompt, :func:`flowrl_loss` is ``sum_i u_i (log_z + ell_i - b_i)^2 / D``
    with ``b_i = beta r_hat_i + ell_ref_i``, ``u_i = w_i`` (times the length ``|y_i|`` when
    ``sequence_weighting="length"``) and D the normalizer. It is a parabola in log_z, least at::

        log_z* = sum_i u_i (beta r_hat_i + ell_ref_i - ell_i) / sum_i u_i

    the weighted group mean; the loss there is the weighted variance of ``ell - b`` within the group.
    The options are :func:`flowrl_loss`'s, so ``u`` is exactly the loss's weight: pass the same ones.
    It is :func:`group_log_z_terms` (each sample's target and weight) followed by
    :func:`weighted_mean_by_group`; an engine whose groups are spread over processes gathers the terms
    and calls the second itself.

    **Detached, and why.** The result carries no gradient history. Writing the group loss as
    ``L(theta, c)`` with ``c = log_z``, the total derivative through an estimate ``c*(theta)`` is
    ``dL/dtheta = dL/dtheta|_c* + dL/dc|_c* * dc*/dtheta``, and ``dL/dc|_c* = 2 sum_i u_i delta_i / D
    = 0`` by the definition of ``c*``. So when the estimate is the exact minimizer of the loss being
    differentiated (same ``ell``, same weights, the whole group), letting gradient flow through it
    changes nothing: detaching costs no accuracy, and it lets the estimate be computed ahead of the
    update, from a pass without gradient, and handed to micro-batches that cut across groups, like the
    advantages. When it is not the exact minimizer (weights that differ from the loss's, or ``ell``
    from a policy a few optimizer steps older), a gradient through it would add ``dL/dc * dc/dtheta``,
    a pull on every sample of the group towards moving the group mean, which no FlowRL term asks for;
    detached, it stays what log Z is in the loss: a per-prompt baseline. The policy gradient then equals
    the head mode's with the head at this optimum (the head's own backbone term,
    ``2 sum_i u_i delta_i grad log Z(x) / D``, is zero there as well).

    A group of one valid sample gets that sample's own value (residual 0: no gradient); a group with
    no valid sample gets 0.

    Args:
        logprobs: (N, T) log-probs of the policy whose ``ell`` the loss will differentiate (in the
            trainer: the policy before the update, whose log-probs equal ``old_logprobs``).
        old_logprobs: (N, T) log-probs of the policy that sampled the responses.
        ref_logprobs: (N, T) log-probs of the reference policy.
        advantages: (N,) r_hat, the reward term that ``beta`` multiplies, as in :func:`flowrl_loss`.
        response_mask: (N, T), 1 on real response tokens.
        num_samples_per_prompt: n, the group size, when groups are contiguous rows (n must divide N).
        group_ids: (N,) integer id of each sample's group, in any order (verl's ``uid``); instead of
            ``num_samples_per_prompt``. Exactly one of the two is given.
        valid: (N,) bool, optional: False for samples left out of the update (failed rewards), which
            are left out of their group's mean too.
        beta, importance_weight, max_importance_weight, clip_eps, reference, sequence_weighting:
            as in :func:`flowrl_loss`.

    Returns:
        (N,) log Z of each sample's prompt (the same within a group), without gradient history.
    """
    n = num_samples_per_prompt
    if (n is None) == (group_ids is None):
        raise ValueError("give exactly one of num_samples_per_prompt (contiguous groups) and group_ids")
    num = advantages.shape[0]
    if n is not None:
        if n < 1 or num % n != 0:
            raise ValueError(
                f"num_samples_per_prompt={n} must be a positive divisor of the number of responses "
                f"N={num}; responses come in contiguous groups of num_samples_per_prompt"
            )
        group_ids = torch.arange(num, device=advantages.device) // n
    target, weight = group_log_z_terms(
        logprobs,
        old_logprobs,
        ref_logprobs,
        advantages,
        response_mask,
        valid=valid,
        beta=beta,
        importance_weight=importance_weight,
        max_importance_weight=max_importance_weight,
        clip_eps=clip_eps,
        reference=reference,
        sequence_weighting=sequence_weighting,
    )
    return weighted_mean_by_group(target, weight, group_ids)


def group_log_z_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    valid: Tensor | None = None,
    beta: float = BETA,
    importance_weight: str = "clamp",
    max_importance_weight: float = MAX_IMPORTANCE_WEIGHT,
    clip_eps: float = CLIP_EPS,
    reference: str = "ref",
    sequence_weighting: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Each sample's part in its group's estimate of :func:`group_log_z`: its target and its weight.

    Per sequence, detached: the target ``t_i = beta r_hat_i + ell_ref_i - ell_i`` (the log Z that
    zeroes its residual) and the loss's weight ``u_i`` (``w_i``, times ``|y_i|`` for
    ``sequence_weighting="length"``; 0 for a sample left out by ``valid``, whose target may be NaN).
    Per-sequence scalars, so an engine that spreads a group's samples over processes gathers these two
    (N,) vectors, not the (N, T) log-probs, and finishes with :func:`weighted_mean_by_group`.

    Args:
        logprobs, old_logprobs, ref_logprobs, advantages, response_mask, valid, beta,
        importance_weight, max_importance_weight, clip_eps, reference, sequence_weighting: as in
            :func:`group_log_z`.

    Returns:
        ``(target, weight)``, both (N,), without gradient history.
    """
    s = _sequence_terms(
        logprobs.detach(),
        old_logprobs.detach(),
        ref_logprobs.detach(),
        response_mask,
        per_sequence={"advantages": advantages, **({} if valid is None else {"valid": valid})},
        importance_weight=importance_weight,
        max_importance_weight=max_importance_weight,
        clip_eps=clip_eps,
        reference=reference,
        sequence_weighting=sequence_weighting,
    )
    target = beta * advantages.detach() + s.baseline - s.ell  # (N,) the log_z that zeroes each residual
    weight = s.weight if s.lengths is None else s.weight * s.lengths.to(s.weight.dtype)
    if valid is not None:
        weight = torch.where(valid.to(torch.bool), weight, torch.zeros_like(weight))
    return target, weight


def weighted_mean_by_group(target: Tensor, weight: Tensor, group_ids: Tensor) -> Tensor:
    """``sum_i u_i t_i / sum_i u_i`` over the rows of each group, given back on every row of the group.

    Rows of weight 0 take no part (their target may be NaN: a sample without reward); a group whose
    weights are all 0 gets 0.

    Args:
        target: (N,) the per-sample values t_i (:func:`group_log_z_terms`).
        weight: (N,) nonnegative weights u_i.
        group_ids: (N,) integer group id of each row; rows of one group need not be adjacent.

    Returns:
        (N,) each row's group mean, without gradient history.
    """
    if not target.shape == weight.shape == group_ids.shape or target.dim() != 1:
        raise ValueError(
            f"target, weight and group_ids must all be (N,); got {tuple(target.shape)}, "
            f"{tuple(weight.shape)} and {tuple(group_ids.shape)}"
        )
    target, weight = target.detach(), weight.detach()
    _, group = torch.unique(group_ids, return_inverse=True)  # (N,) 0 .. G-1
    num_groups = int(group.max()) + 1 if group.numel() else 0
    # where() rather than a product: a left-out sample's target may be NaN (no reward)
    weighted = torch.where(weight > 0, weight * target, torch.zeros_like(target))
    sums = torch.zeros(num_groups, dtype=target.dtype, device=target.device).index_add_(0, group, weighted)
    totals = torch.zeros(num_groups, dtype=weight.dtype, device=weight.device).index_add_(0, group, weight)
    safe = torch.where(totals > 0, totals, torch.ones_like(totals))
    return torch.where(totals > 0, sums / safe, torch.zeros_like(sums))[group]
