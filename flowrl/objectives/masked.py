"""Masked reductions and loss aggregation: the one place where padding is handled.

Shape legend:
    N  sequences in the batch (prompts x samples, contiguous groups of ``num_samples_per_prompt``)
    T  response tokens (right-padded)
    mask  (N, T) bool or 0/1 float, 1 on real response tokens

Padding is removed with ``torch.where``, never by multiplying with the mask, so padded positions may
hold anything (large values, inf, NaN) without reaching a result or a gradient.

Every objective reduces its per-token or per-sequence terms with :func:`aggregate_loss` or
:func:`mean_over_sequences`, so FlowRL and the baselines differ only in their math. Both accept a
``normalizer``: the number of units (tokens or sequences) of the whole mini-batch. Dividing each
micro-batch's summed loss by it makes gradient accumulation over micro-batches give exactly the
mini-batch mean; :func:`count_units` returns the matching local count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""How per-token losses become a scalar (the names follow verl's ``loss_agg_mode``).

- ``token-mean``: every real token of the batch counts once (DAPO, REINFORCE++ and PPO in verl).
- ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO, 2402.03300).
- ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
- ``seq-mean-token-sum-norm``: token sums divided by a constant ``max_response_length``, then the
  mean over sequences: Dr. GRPO (2503.20783), which removes GRPO's length bias.
"""


def _nonzero(denominator: Tensor) -> Tensor:
    """``denominator`` with zeros replaced by 1, so an empty selection reduces to 0 instead of NaN."""
    return torch.where(denominator != 0, denominator, torch.ones_like(denominator))


def apply_mask(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` on real entries, exact zeros (with zero gradient) elsewhere.

    Args:
        values: any shape, e.g. (N, T).
        mask: broadcastable to ``values``; nonzero on real entries.

    Returns:
        Same shape as ``values``.
    """
    return torch.where(mask.to(torch.bool), values, torch.zeros((), dtype=values.dtype, device=values.device))


def _count(values: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    """Number of real entries of ``values`` along ``dim`` (all of them when ``dim`` is None)."""
    counts = mask.to(torch.bool).expand_as(values)
    total = counts.sum() if dim is None else counts.sum(dim)
    # Counts are exact in float32 (and wider) but not in half precision, where the mean then promotes.
    return _nonzero(total.to(torch.promote_types(values.dtype, torch.float32)))


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` over the real entries.

    Args:
        values: (N, T) or any shape.
        mask: broadcastable to ``values``; nonzero on real entries.
        dim: dimension to reduce; None reduces everything to a scalar.

    Returns:
        ``values`` summed over ``dim`` (a scalar when ``dim`` is None), e.g. (N,) for ``dim=-1``.
    """
    masked = apply_mask(values, mask)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the real entries (0 where there are none).

    Args:
        values: (N, T) or any shape.
        mask: broadcastable to ``values``; nonzero on real entries.
        dim: dimension to reduce; None averages over every real entry of the tensor.

    Returns:
        Mean over ``dim`` (a scalar when ``dim`` is None), e.g. (N,) for ``dim=-1``; float32 for
        half-precision ``values``.
    """
    return masked_sum(values, mask, dim) / _count(values, mask, dim)


def kl_k3(logprobs: Tensor, other_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_q), where ``logprobs`` are pi's and ``other_logprobs`` pi_q's.

    With ``p = logprobs`` and ``q = other_logprobs``, ``k3 = exp(q - p) - (q - p) - 1``: the estimator
    "k3" of J. Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html).
    It is nonnegative (``e^x >= 1 + x``), 0 exactly where the log-probs are equal, and unbiased on tokens
    sampled from pi: ``E_pi[k3] = E_pi[r] - 1 - E_pi[log r] = KL(pi || pi_q)`` with ``r = pi_q / pi``,
    since ``E_pi[r] = 1`` (in floating point, ``k3 ~ (q - p)^2 / 2`` rounds to 0 for differences
    below about the square root of the dtype's resolution). The one copy of the formula: GRPO's KL
    loss and REINFORCE++'s KL penalty (``advantages.kl_penalty(..., "k3")``) and the ``actor/ppo_kl``
    / ``actor/ref_kl`` metrics (:func:`masked_kl_k3`) all call it.

    Not under ``no_grad`` (GRPO's KL loss differentiates it) and not masked: pass masked inputs, or use
    :func:`masked_kl_k3`, when padded positions may hold large values.

    Args:
        logprobs: (N, T) log pi of the sampled tokens.
        other_logprobs: (N, T) log pi_q of the same tokens (old/rollout or reference policy).

    Returns:
        (N, T) per-token estimates, >= 0.
    """
    if other_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"the two log-prob tensors have shapes {tuple(logprobs.shape)} and "
            f"{tuple(other_logprobs.shape)}; they must match"
        )
    log_ratio = other_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def masked_kl_k3(logprobs: Tensor, other_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL(pi || pi_q) per token: the masked mean of :func:`kl_k3` over the real tokens, detached.

    The ``actor/ppo_kl`` (pi_q: the old/rollout policy) and ``actor/ref_kl`` (pi_q: the reference policy)
    metrics of every objective. Always >= 0; 0 when the log-probs agree on every real token (or differ
    by less than the rounding of :func:`kl_k3`). Padded positions are zeroed before the exponential, so
    they may hold anything.

    Args:
        logprobs: (N, T) log-probs of the current policy.
        other_logprobs: (N, T) log-probs of the old or reference policy.
        mask: (N, T), nonzero on real response tokens.

    Returns:
        Scalar tensor (0 when there is no real token).
    """
    logprobs, other_logprobs = logprobs.detach(), other_logprobs.detach()
    per_token = kl_k3(apply_mask(logprobs, mask), apply_mask(other_logprobs, mask))
    return masked_mean(per_token, mask)


def sequence_lengths(mask: Tensor) -> Tensor:
    """Number of real tokens of each sequence.

    Args:
        mask: (N, T), nonzero on real response tokens.

    Returns:
        (N,) float32 lengths.
    """
    return mask.to(torch.bool).sum(dim=-1).to(torch.float32)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Standardize over all real entries: ``(x - mean) / sqrt(var + eps)``, zeros on padding.

    The variance is the unbiased (n - 1) one, as in the group normalization of GRPO. Used for the
    REINFORCE++ advantages (2501.03262), which are whitened over the whole batch.

    Args:
        values: (N, T).
        mask: (N, T), nonzero on real tokens.
        eps: added to the variance so a constant input maps to 0 instead of NaN.

    Returns:
        (N, T) whitened values; 0 on padded positions.
    """
    mean = masked_mean(values, mask)
    centered = apply_mask(values - mean, mask)
    # Bessel's correction; a single real entry has variance 0 (its denominator 0 is replaced by 1).
    variance = centered.square().sum() / _nonzero(_count(values, mask, None) - 1)
    return apply_mask(centered * torch.rsqrt(variance + eps), mask)


def check_batch_shapes(
    response_mask: Tensor,
    *,
    per_token: Mapping[str, Tensor] | None = None,
    per_sequence: Mapping[str, Tensor] | None = None,
) -> None:
    """Raise a ValueError naming the offending argument unless the batch layout is consistent.

    Args:
        response_mask: (N, T), the layout every other tensor must follow.
        per_token: tensors that must be (N, T), by argument name.
        per_sequence: tensors that must be (N,), by argument name.
    """
    if response_mask.dim() != 2:
        raise ValueError(
            f"response_mask must be (N, T), sequences x response tokens; got {tuple(response_mask.shape)}"
        )
    n, t = response_mask.shape
    checks = [(name, tensor, (n, t), "(N, T)") for name, tensor in (per_token or {}).items()]
    checks += [(name, tensor, (n,), "(N,)") for name, tensor in (per_sequence or {}).items()]
    for name, tensor, shape, legend in checks:
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {legend} = {shape} to match "
                f"response_mask {tuple(response_mask.shape)}"
            )


def _check_loss_agg_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; use one of {', '.join(LOSS_AGG_MODES)}")


def _check_normalizer(normalizer: float | None) -> None:
    if normalizer is not None and not normalizer > 0:
        raise ValueError(
            f"normalizer must be a positive unit count (the sum of count_units over the mini-batch), "
            f"got {normalizer}"
        )


def mean_over_sequences(
    values: Tensor, *, normalizer: float | None = None, weights: Tensor | None = None
) -> Tensor:
    """Mean of a per-sequence quantity, optionally weighted, optionally over a larger batch.

    Args:
        values: (N,) one value per sequence.
        normalizer: when given, the (weighted) sum is divided by it instead of by N (or by the sum of
            ``weights``): pass the mini-batch total so micro-batch losses add up to the mini-batch mean.
        weights: (N,) optional nonnegative per-sequence weights: the result is ``sum(w v) / sum(w)``.

    Returns:
        Scalar tensor.
    """
    _check_normalizer(normalizer)
    if weights is None:
        total, count = values.sum(), values.new_tensor(float(values.shape[0]))
    else:
        if weights.shape != values.shape:
            raise ValueError(
                f"weights has shape {tuple(weights.shape)} but values has {tuple(values.shape)}; "
                "pass one weight per sequence"
            )
        total, count = (weights * values).sum(), weights.sum()
    denominator = _nonzero(count) if normalizer is None else values.new_tensor(normalizer)
    return total / denominator


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    normalizer: float | None = None,
    max_response_length: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar according to ``mode`` (see :data:`LOSS_AGG_MODES`).

    Args:
        values: (N, T) per-token loss.
        mask: (N, T), nonzero on real response tokens.
        mode: one of :data:`LOSS_AGG_MODES`.
        normalizer: when given, the summed per-unit losses are divided by it instead of by the local
            unit count (units are tokens for ``token-mean``, sequences otherwise; see
            :func:`count_units`).
        max_response_length: the constant divisor of ``seq-mean-token-sum-norm``; defaults to T. Pass
            the generation budget when micro-batches may be padded to different lengths.

    Returns:
        Scalar tensor.
    """
    _check_loss_agg_mode(mode)
    _check_normalizer(normalizer)
    if values.shape != mask.shape:
        raise ValueError(
            f"per-token values have shape {tuple(values.shape)} but the mask has {tuple(mask.shape)}; "
            "they must match (N, T)"
        )
    if mode == "token-mean":
        denominator = _count(values, mask, None) if normalizer is None else values.new_tensor(normalizer)
        return masked_sum(values, mask) / denominator
    if mode == "seq-mean-token-mean":
        per_sequence = masked_mean(values, mask, dim=-1)
    elif mode == "seq-mean-token-sum":
        per_sequence = masked_sum(values, mask, dim=-1)
    else:  # seq-mean-token-sum-norm
        length = values.shape[-1] if max_response_length is None else max_response_length
        if length <= 0:
            raise ValueError(f"max_response_length must be positive, got {length}")
        per_sequence = masked_sum(values, mask, dim=-1) / length
    return mean_over_sequences(per_sequence, normalizer=normalizer)


def count_units(mask: Tensor, mode: str) -> float:
    """The local number of units :func:`aggregate_loss` averages over in ``mode``.

    Sum it over the micro-batches of a mini-batch and pass the total as ``normalizer``.

    Args:
        mask: (N, T), nonzero on real response tokens.
        mode: one of :data:`LOSS_AGG_MODES`.

    Returns:
        Number of real tokens for ``token-mean``, number of sequences N otherwise.
    """
    _check_loss_agg_mode(mode)
    if mode == "token-mean":
        return float(sequence_lengths(mask).sum())
    return float(mask.shape[0])
