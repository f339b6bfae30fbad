"""Advantage estimators (flowrl.objectives.advantages)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from flowrl.objectives.advantages import gae, group_normalized_rewards, kl_penalty, reinforce_pp_advantages

NAN = float("nan")


def test_group_normalization_worked_example() -> None:
    # one group [1, 0, 1, 0]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735
    # r_hat = +-0.5 / 0.57735 = +-0.866025
    r_hat = group_normalized_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4)
    assert r_hat.tolist() == pytest.approx([0.866025, -0.866025, 0.866025, -0.866025], abs=1e-5)
    # two groups [1, 0] and [1, 0]: mean 0.5, std sqrt(0.5) = 0.707107, r_hat = +-0.707107
    r_hat = group_normalized_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0]), 2)
    assert r_hat.tolist() == pytest.approx([0.707107, -0.707107, 0.707107, -0.707107], abs=1e-5)


def test_group_normalization_is_zero_mean_per_group_and_exactly_zero_for_equal_rewards() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3, -2.0, 5.0, 7.0, 7.0, 7.0], dtype=torch.float32)
    r_hat = group_normalized_rewards(rewards, 3).view(3, 3)
    assert r_hat[0].tolist() == [0.0, 0.0, 0.0]  # equal rewards: exactly 0, not an ulp divided by eps
    assert r_hat[2].tolist() == [0.0, 0.0, 0.0]
    assert r_hat.sum(dim=1).abs().max().item() < 1e-5
    assert r_hat[1].std().item() == pytest.approx(1.0, abs=1e-5)  # unit (unbiased) std in a varied group


def test_group_of_one_keeps_the_raw_reward() -> None:
    rewards = torch.tensor([0.5, -1.0, 2.0])
    assert group_normalized_rewards(rewards, 1).tolist() == rewards.tolist()
    assert group_normalized_rewards(rewards, 1, scale_by_std=False).tolist() == rewards.tolist()


def test_affine_rescaling_of_rewards_changes_nothing() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.2], dtype=torch.float64)
    torch.testing.assert_close(
        group_normalized_rewards(rewards, 4),
        group_normalized_rewards(3.0 * rewards - 7.0, 4),
        atol=1e-5,
        rtol=0,
    )


def test_dr_grpo_only_subtracts_the_group_mean() -> None:
    r_hat = group_normalized_rewards(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2, scale_by_std=False)
    assert r_hat.tolist() == [1.0, -1.0, 0.0, 0.0]  # group means 2 and 2


def test_integer_rewards_are_accepted_and_no_gradient_is_kept() -> None:
    assert group_normalized_rewards(torch.tensor([1, 0]), 2).dtype == torch.float32
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not group_normalized_rewards(rewards, 2).requires_grad


def test_group_size_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match=r"num_samples_per_prompt=3 .* N=4"):
        group_normalized_rewards(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="num_samples_per_prompt=0"):
        group_normalized_rewards(torch.zeros(4), 0)
    with pytest.raises(ValueError, match=r"rewards must be \(N,\)"):
        group_normalized_rewards(torch.zeros(4, 1), 2)


def test_kl_estimators_worked_example() -> None:
    # d = log pi - log pi_ref = log 2: k1 = 0.693147, k2 = d^2 / 2 = 0.240227, k3 = 1/2 - 1 + d = 0.193147
    logprobs, ref_logprobs = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_penalty(logprobs, ref_logprobs, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_penalty(logprobs, ref_logprobs, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_penalty(logprobs, ref_logprobs, "k3").item() == pytest.approx(0.193147, abs=1e-6)


def test_kl_estimators_are_zero_at_equality_and_k3_is_nonnegative() -> None:
    logprobs = -torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    ref_logprobs = logprobs + torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for kind in ("k1", "k2", "k3"):
        assert kl_penalty(logprobs, logprobs, kind).abs().max().item() == 0.0
    assert kl_penalty(logprobs, ref_logprobs, "k3").min().item() >= 0.0


def test_unknown_kl_estimator_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown kl estimator 'mse'; use one of k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "mse")
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 3), "k1")


def test_reinforce_pp_puts_kl_into_the_reward_then_whitens() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old_logprobs = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, NAN]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-1.0, 0.0, 0.0], [0.0, -1.0, NAN]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # k1 = old - ref: row 0 [1, 0, 0], row 1 [0, 1, -]; kl_coef 0.1 gives token rewards
    #   row 0: [-0.1, 0, 0 + 1 (reward on the last token)]      row 1: [0, -0.1 + 0 (last token)]
    # undiscounted return-to-go: row 0 [0.9, 1.0, 1.0], row 1 [-0.1, -0.1]
    returns = [0.9, 1.0, 1.0, -0.1, -0.1]
    mean, stdev = statistics.mean(returns), statistics.stdev(returns)
    advantages = reinforce_pp_advantages(rewards, mask, old_logprobs, ref_logprobs, kl_coef=0.1)
    real = advantages[mask.bool()]
    assert real.tolist() == pytest.approx([(x - mean) / stdev for x in returns], abs=1e-6)
    assert advantages[1, 2].item() == 0.0  # padding
    assert abs(real.mean().item()) < 1e-9 and real.std().item() == pytest.approx(1.0, abs=1e-6)


def test_reinforce_pp_without_kl_is_the_whitened_outcome(make_batch) -> None:
    batch = make_batch()
    mask = batch["response_mask"]
    advantages = reinforce_pp_advantages(
        batch["rewards"], mask, batch["old_logprobs"], batch["ref_logprobs"], kl_coef=0.0
    )
    # every token of a response has the same return (its reward), whitened over all real tokens
    tokens = torch.repeat_interleave(batch["rewards"], batch["lengths"])
    torch.testing.assert_close(advantages[mask], (tokens - tokens.mean()) / tokens.std())
    assert not advantages.isnan().any()


def test_reinforce_pp_rejects_a_reward_per_token() -> None:
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"rewards has shape \(2, 3\), expected \(N,\)"):
        reinforce_pp_advantages(torch.zeros(2, 3), mask, torch.zeros(2, 3), torch.zeros(2, 3))


def test_gae_worked_example() -> None:
    # gamma 0.9, lam 0.8, rewards [0, 0, 1], values [0.5, 0.6, 0.7], value after the end 0:
    #   delta_2 = 1 - 0.7 = 0.3                     A_2 = 0.3
    #   delta_1 = 0.9 * 0.7 - 0.6 = 0.03            A_1 = 0.03 + 0.72 * 0.3 = 0.246
    #   delta_0 = 0.9 * 0.6 - 0.5 = 0.04            A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    # row 1 is the same response right-padded with garbage, row 2 a one-token response.
    rewards = torch.tensor(
        [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 9.0], [2.0, NAN, NAN, NAN]], dtype=torch.float64
    )
    values = torch.tensor(
        [[0.5, 0.6, 0.7, 0.0], [0.5, 0.6, 0.7, NAN], [0.5, 3.0, 3.0, 3.0]], dtype=torch.float64
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row in (0, 1):
        assert advantages[row, :3].tolist() == pytest.approx([0.21712, 0.246, 0.3])
        assert returns[row, :3].tolist() == pytest.approx([0.71712, 0.846, 1.0])
    # one token: A = 2 - 0.5 = 1.5, return 2
    assert advantages[2, 0].item() == pytest.approx(1.5) and returns[2, 0].item() == pytest.approx(2.0)
    assert (
        advantages[~mask.bool()].abs().sum().item() == 0.0 and returns[~mask.bool()].abs().sum().item() == 0.0
    )


def test_gae_with_lambda_one_is_the_discounted_return_minus_value() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.3, -0.2, 0.7]])
    # lam = 1: A_t = sum_k gamma^k r_{t+k} - V_t; returns are the discounted returns themselves
    gamma = 0.5
    discounted = [1 + gamma * 2 + gamma**2 * 3, 2 + gamma * 3, 3.0]
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=gamma, lam=1.0)
    assert returns[0].tolist() == pytest.approx(discounted)
    assert advantages[0].tolist() == pytest.approx(
        [d - v for d, v in zip(discounted, [0.3, -0.2, 0.7], strict=True)]
    )


def test_gae_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"values has shape \(2, 2\), expected \(N, T\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3))


def test_invalid_responses_are_left_out_of_their_group() -> None:
    rewards = torch.tensor([1.0, NAN, 0.0, 1.0, 2.0, NAN, NAN, NAN])
    valid = torch.tensor([True, False, True, True, True, False, False, False])
    # group 0 keeps [1, 0, 1]: mean 2/3, unbiased std sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3) = 0.57735
    #   r_hat = [1/3, -2/3, 1/3] / 0.57735 = [0.57735, -1.154701, 0.57735]
    # group 1 keeps one response: the group-of-one rule, r_hat = r = 2
    r_hat = group_normalized_rewards(rewards, 4, valid=valid)
    assert r_hat.tolist() == pytest.approx([0.57735, 0.0, -1.154701, 0.57735, 2.0, 0.0, 0.0, 0.0], abs=1e-5)
    unscaled = group_normalized_rewards(rewards, 4, valid=valid, scale_by_std=False)
    assert unscaled.tolist() == pytest.approx([1 / 3, 0.0, -2 / 3, 1 / 3, 2.0, 0.0, 0.0, 0.0])


def test_all_valid_mask_changes_nothing() -> None:
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.2, 5.0, 5.0])
    torch.testing.assert_close(
        group_normalized_rewards(rewards, 2, valid=torch.ones(6, dtype=torch.bool)),
        group_normalized_rewards(rewards, 2),
    )


def test_reinforce_pp_leaves_invalid_responses_out_of_the_whitening(make_batch) -> None:
    batch = make_batch(num_prompts=2, num_samples_per_prompt=3)
    rewards = batch["rewards"].clone()
    rewards[1] = NAN
    valid = ~rewards.isnan()
    args = (batch["response_mask"], batch["old_logprobs"], batch["ref_logprobs"])
    advantages = reinforce_pp_advantages(rewards, *args, kl_coef=0.1, valid=valid)
    kept = reinforce_pp_advantages(rewards[valid], *(x[valid] for x in args), kl_coef=0.1)
    torch.testing.assert_close(advantages[valid], kept)
    assert advantages[1].abs().sum().item() == 0.0
