"""Advantage estimators: group-normalized rewards, REINFORCE++ returns, GAE, KL penalties.

Shape legend:
    N  sequences (prompts x samples, contiguous groups of ``num_samples_per_prompt``)
    T  response tokens (right-padded)
    response_mask  (N, T), 1 on real response tokens

Advantages are targets, not functions of the parameters: every estimator runs under
``torch.no_grad()`` and returns a tensor without history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.objectives.masked import (
    apply_mask,
    check_batch_shapes,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from flowrl.objectives.options import Options, check_choice, option

KL_ESTIMATORS = ("k1", "k2", "k3")
"""Schulman's per-token estimators of KL(pi || pi_ref) from tokens sampled from pi ("Approximating KL
Divergence", 2020). With the log-ratio ``d = log pi - log pi_ref``: k1 = d, k2 = d^2 / 2,
k3 = exp(-d) - 1 + d (:func:`flowrl.objectives.masked.kl_k3`, the one copy of it)."""

KL_COEF = 0.001
"""Weight of the per-token KL penalty in REINFORCE++'s reward (verl's default ``kl_ctrl.kl_coef``)."""

GROUP_STD_EPS = 1e-6
"""Added to the group std in GRPO's normalization (2402.03300; verl's ``epsilon``)."""


@torch.no_grad()
def group_normalized_rewards(
    rewards: Tensor,
    num_samples_per_prompt: int,
    eps: float = GROUP_STD_EPS,
    *,
    scale_by_std: bool = True,
    valid: Tensor | None = None,
) -> Tensor:
    """GRPO's outcome advantage: rewards standardized within each prompt's group (2402.03300, sec. 4.1.2).

    ``r_hat = (r - mean_group(r)) / (std_group(r) + eps)`` with the unbiased (n - 1) std. A group of one
    uses mean 0 and std 1, so ``r_hat = r`` (verl's convention, here without eps). A group whose rewards
    are all equal gets exactly 0. With ``scale_by_std=False`` only the mean is subtracted: Dr. GRPO
    (2503.20783), which argues the std division biases updates toward too easy and too hard prompts.

    Args:
        rewards: (N,) one scalar reward per response; groups are contiguous.
        num_samples_per_prompt: n, the group size; must divide N.
        eps: added to the std.
        scale_by_std: divide by the group std (GRPO) or not (Dr. GRPO).
        valid: (N,) bool, optional: False for responses whose reward could not be computed (their
            reward may be NaN). They are left out of their group's statistics and get 0; a group with
            a single valid member follows the group-of-one rule.

    Returns:
        (N,) normalized rewards, same dtype as ``rewards`` (float32 when they are integers).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), one per response; got shape {tuple(rewards.shape)}")
    n = num_samples_per_prompt
    if n < 1 or rewards.shape[0] % n != 0:
        raise ValueError(
            f"num_samples_per_prompt={n} must be a positive divisor of the number of responses "
            f"N={rewards.shape[0]}; responses come in contiguous groups of num_samples_per_prompt per prompt"
        )
    if valid is not None and valid.shape != rewards.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected (N,) = {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    groups = rewards.view(-1, n)
    members = torch.ones_like(groups, dtype=torch.bool) if valid is None else valid.view(-1, n).to(torch.bool)
    size = members.sum(dim=1, keepdim=True)
    # Shift by the first valid member before averaging: a group of equal rewards then gives exact zeros
    # (a float mean of equal numbers can miss them by an ulp, which the division by eps magnifies).
    anchor = groups.gather(1, members.to(torch.uint8).argmax(dim=1, keepdim=True))
    shifted = groups - anchor
    centered = apply_mask(shifted - masked_mean(shifted, members, dim=1).unsqueeze(1), members)
    std = (masked_sum(centered.square(), members, dim=1).unsqueeze(1) / (size - 1).clamp(min=1)).sqrt()
    normalized = centered / (std + eps) if scale_by_std else centered
    normalized = torch.where(size == 1, groups, normalized)  # a group of one: mean 0, std 1
    return apply_mask(normalized, members).reshape(-1)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (see :data:`KL_ESTIMATORS`).

    Not under ``no_grad``: GRPO's KL loss differentiates it.

    Args:
        logprobs: (N, T) log pi of the sampled tokens.
        ref_logprobs: (N, T) log pi_ref of the same tokens.
        kind: ``"k1"`` (unbiased, high variance), ``"k2"`` (squared log-ratio / 2) or ``"k3"``
            (unbiased and nonnegative; GRPO's choice, 2402.03300 eq. 4).

    Returns:
        (N, T) per-token estimates (padding is not masked here).
    """
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"ref_logprobs has shape {tuple(ref_logprobs.shape)} but logprobs has {tuple(logprobs.shape)}; "
            "they must match"
        )
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown kl estimator {kind!r}; use one of {', '.join(KL_ESTIMATORS)}")


def _last_token_index(response_mask: Tensor) -> Tensor:
    """(N,) index of the last real token of each row (0 for an empty row)."""
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
    return torch.where(response_mask.to(torch.bool), positions, 0).argmax(dim=-1)


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    kl_coef: float = KL_COEF,
    kl_estimator: str = "k1",
    valid: Tensor | None = None,
) -> Tensor:
    """REINFORCE++ advantages (Hu, 2501.03262): KL-shaped token rewards, return-to-go, batch whitening.

    Token reward ``-kl_coef * kl_t`` on every response token plus the scalar reward on the last one;
    the undiscounted return-to-go of those rewards; then whitened over all real tokens of the batch
    (the global normalization that replaces GRPO's per-prompt one).

    Args:
        rewards: (N,) scalar outcome reward per response.
        response_mask: (N, T), 1 on real response tokens.
        old_logprobs: (N, T) log-probs of the sampling policy.
        ref_logprobs: (N, T) log-probs of the reference policy.
        kl_coef: weight of the per-token KL penalty in the reward.
        kl_estimator: one of :data:`KL_ESTIMATORS`.
        valid: (N,) bool, optional: False for responses whose reward could not be computed (their
            reward may be NaN); they are left out of the whitening and get 0.

    Returns:
        (N, T) advantages, 0 on padding (and on invalid responses).
    """
    check_batch_shapes(
        response_mask,
        per_token={"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs},
        per_sequence={"rewards": rewards, **({} if valid is None else {"valid": valid})},
    )
    real = response_mask.to(torch.bool)
    if valid is not None:
        real = real & valid.to(torch.bool).unsqueeze(-1)
    kl = kl_penalty(apply_mask(old_logprobs, real), apply_mask(ref_logprobs, real), kl_estimator)
    token_rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    token_rewards[rows, _last_token_index(real)] += rewards.to(token_rewards.dtype)
    returns = apply_mask(token_rewards, real).flip(-1).cumsum(-1).flip(-1)
    return masked_whiten(returns, real)


@torch.no_grad()
def gae(
    token_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al., 1506.02438) for PPO (1707.06347).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``; the value after
    the last real token is 0 (the response ended). Rewards and values on padding are zeroed first, so
    with right padding the recursion passes zeros through the padded tail. Returns are ``A_t + V_t``,
    the critic's regression target. Not whitened: verl whitens the advantages afterwards
    (``masked_whiten``), which the caller may do.

    Args:
        token_rewards: (N, T) reward per token (usually the outcome on the last token, minus a KL term).
        values: (N, T) critic values V_t of the states before each token.
        response_mask: (N, T), 1 on real response tokens (right-padded).
        gamma: discount factor (1.0 for LLM responses, as in verl).
        lam: GAE's bias-variance trade-off (0.95, verl's default).

    Returns:
        ``(advantages, returns)``, each (N, T), 0 on padding.
    """
    check_batch_shapes(response_mask, per_token={"token_rewards": token_rewards, "values": values})
    token_rewards, values = apply_mask(token_rewards, response_mask), apply_mask(values, response_mask)
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[-1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    advantages = apply_mask(advantages, response_mask)
    return advantages, apply_mask(advantages + values, response_mask)


@dataclass(frozen=True)
class GroupAdvantageOptions(Options):
    """The option of the group-normalized advantage (GRPO's, FlowRL's r_hat):
    :func:`group_normalized_rewards`'s ``eps``."""

    eps: float = option(group_normalized_rewards, "eps", "added to the group's reward std (verl's epsilon)")

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps a group of equal rewards finite), got {self.eps}")


@dataclass(frozen=True)
class ReinforcePPAdvantageOptions(Options):
    """The keyword options of :func:`reinforce_pp_advantages`, with its defaults."""

    kl_coef: float = option(
        reinforce_pp_advantages, "kl_coef", "weight of the per-token KL penalty in the reward"
    )
    kl_estimator: str = option(
        reinforce_pp_advantages, "kl_estimator", f"per-token KL estimate: {', '.join(KL_ESTIMATORS)}"
    )

    def __post_init__(self) -> None:
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
