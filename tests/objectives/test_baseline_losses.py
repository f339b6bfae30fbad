"""The baselines: PPO's clipped surrogate and value loss, GRPO, Dr. GRPO, REINFORCE++."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.objectives.advantages import kl_penalty
from flowrl.objectives.grpo import dr_grpo_loss, grpo_loss
from flowrl.objectives.masked import aggregate_loss
from flowrl.objectives.ppo import clipped_surrogate, ppo_policy_loss, value_loss
from flowrl.objectives.reinforce_pp import reinforce_pp_loss

NAN = float("nan")


def _one_token(log_ratio: float, advantage: float, **options) -> tuple[float, float, dict]:
    """Loss and d loss / d logprob for a single token with the given log-ratio and advantage."""
    logprobs = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    loss, metrics = clipped_surrogate(
        logprobs,
        torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([advantage]),
        torch.ones(1, 1),
        **options,
    )
    loss.backward()
    return loss.item(), logprobs.grad.item(), metrics


def test_ratio_beyond_the_clip_with_positive_advantage_gives_zero_gradient() -> None:
    # ratio e^0.5 = 1.6487 > 1.2, A = +1: max(-1.6487, -1.2) = -1.2, constant in the ratio
    loss, grad, metrics = _one_token(0.5, 1.0)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    assert metrics["actor/clip_frac"].item() == 1.0
    # k3 with q - p = old - new = -0.5: e^-0.5 + 0.5 - 1
    assert metrics["actor/ppo_kl"].item() == pytest.approx(math.exp(-0.5) - 0.5)


def test_ratio_below_the_clip_with_negative_advantage_gives_zero_gradient() -> None:
    # ratio e^-0.5 = 0.6065 < 0.8, A = -1: max(0.6065, 0.8) = 0.8
    loss, grad, _ = _one_token(-0.5, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0


def test_pessimistic_side_stays_unclipped() -> None:
    # ratio 1.6487 with A = -1: max(1.6487, 1.2) = 1.6487; d/dlogprob (ratio) = ratio
    loss, grad, metrics = _one_token(0.5, -1.0)
    assert loss == pytest.approx(math.exp(0.5)) and grad == pytest.approx(math.exp(0.5))
    assert metrics["actor/clip_frac"].item() == 0.0


def test_clip_higher_widens_only_the_upper_side() -> None:
    # ratio e^0.2 = 1.2214: clipped at 1.2 with eps 0.2, free below 1.3 with clip_eps_high 0.3
    loss, grad, _ = _one_token(0.2, 1.0, clip_eps_high=0.3)
    assert loss == pytest.approx(-math.exp(0.2)) and grad == pytest.approx(-math.exp(0.2))
    loss, grad, _ = _one_token(-0.3, -1.0, clip_eps_high=0.3)  # ratio 0.7408 < 0.8 still clipped
    assert loss == pytest.approx(0.8) and grad == 0.0


def test_ppo_policy_loss_is_the_clipped_surrogate() -> None:
    assert ppo_policy_loss is clipped_surrogate


def _two_sequences() -> dict[str, torch.Tensor]:
    # lengths 2 and 1, on-policy (ratio 1), advantages [1, -2]
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, NAN]], dtype=torch.float64, requires_grad=True)
    return {
        "logprobs": logprobs,
        "old_logprobs": logprobs.detach().clone(),
        "ref_logprobs": torch.tensor([[-1.0, -1.0], [-1.5, NAN]], dtype=torch.float64),
        "advantages": torch.tensor([1.0, -2.0], dtype=torch.float64),
        "response_mask": torch.tensor([[1, 1], [1, 0]]),
    }


def test_grpo_averages_tokens_then_sequences() -> None:
    batch = _two_sequences()
    loss, _ = grpo_loss(**batch)
    # per-token loss -A * ratio = -A; seq means [-1, 2]; mean over sequences 0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d/dlogprob_it = -A_i / (len_i N): row 0: -1 / 4 per token, row 1: 2 / 2 = 1
    assert batch["logprobs"].grad[0].tolist() == pytest.approx([-0.25, -0.25])
    assert batch["logprobs"].grad[1].tolist() == pytest.approx([1.0, 0.0])


def test_dr_grpo_divides_token_sums_by_a_constant_length() -> None:
    batch = _two_sequences()
    loss, _ = dr_grpo_loss(**batch, max_response_length=4)
    # token sums [-2, 2] / 4, mean over sequences: 0; gradient -A_i / (4 N) on every real token
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    assert batch["logprobs"].grad[0].tolist() == pytest.approx([-0.125, -0.125])
    assert batch["logprobs"].grad[1].tolist() == pytest.approx([0.25, 0.0])


def test_grpo_kl_term_adds_kl_coef_times_the_aggregated_kl() -> None:
    batch = _two_sequences()
    plain, metrics = grpo_loss(**batch, kl_coef=0.0)
    with_kl, kl_metrics = grpo_loss(**batch, kl_coef=0.04)
    # k3 = exp(-d) - 1 + d with d = new - ref
    #   row 0: d = [0, -1] -> [0, e - 2 = 0.718282]     row 1: d = 1 -> e^-1 - 1 + 1 = 0.367879
    # seq-mean-token-mean: (0.359141 + 0.367879) / 2 = 0.363510
    assert kl_metrics["actor/kl_loss"].item() == pytest.approx(0.363510, abs=1e-6)
    assert (with_kl - plain).item() == pytest.approx(0.04 * 0.363510, abs=1e-7)
    # ref_kl: the same k3 values, averaged over the 3 real tokens: (0 + 0.718282 + 0.367879) / 3
    assert metrics["actor/ref_kl"].item() == pytest.approx((math.e - 2 + math.exp(-1)) / 3)
    assert metrics["actor/ref_kl"] == kl_metrics["actor/ref_kl"]  # reported whatever kl_coef
    for kind in ("k1", "k2"):
        loss, _ = grpo_loss(**batch, kl_coef=0.5, kl_estimator=kind)
        expected_kl = aggregate_loss(
            kl_penalty(batch["logprobs"].detach(), batch["ref_logprobs"], kind).nan_to_num(),
            batch["response_mask"],
            "seq-mean-token-mean",
        )
        assert (loss - plain).item() == pytest.approx(0.5 * expected_kl.item())


@pytest.mark.parametrize("loss_fn", [grpo_loss, dr_grpo_loss])
def test_grpo_without_reference_reports_no_reference_metrics(loss_fn) -> None:
    # kl_coef 0 and no reference model: the trainer passes ref_logprobs=None
    with_ref = _two_sequences()
    loss_with_ref, metrics_with_ref = loss_fn(**with_ref)
    without_ref = {**_two_sequences(), "ref_logprobs": None}
    loss, metrics = loss_fn(**without_ref)
    assert loss.item() == pytest.approx(loss_with_ref.item())
    loss.backward()
    with_ref_grad = torch.autograd.grad(loss_with_ref, with_ref["logprobs"])[0]
    torch.testing.assert_close(without_ref["logprobs"].grad, with_ref_grad)
    assert "actor/ref_kl" not in metrics and "actor/kl_loss" not in metrics
    assert set(metrics) == {"actor/pg_loss", "actor/clip_frac", "actor/ppo_kl", "actor/ratio"}
    assert {"actor/ref_kl", "actor/kl_loss"} <= set(metrics_with_ref)


@pytest.mark.parametrize("loss_fn", [grpo_loss, dr_grpo_loss])
def test_grpo_kl_loss_without_reference_log_probs_is_refused(loss_fn) -> None:
    with pytest.raises(ValueError, match=r"kl_coef=0.04 needs ref_logprobs.*or set kl_coef=0"):
        loss_fn(**{**_two_sequences(), "ref_logprobs": None}, kl_coef=0.04)


def test_grpo_kl_gradient_pulls_toward_the_reference() -> None:
    batch = _two_sequences()
    batch["advantages"] = torch.zeros(2, dtype=torch.float64)
    loss, _ = grpo_loss(**batch, kl_coef=1.0, kl_estimator="k2")
    loss.backward()
    # k2 gradient: d/dnew (new - ref)^2 / 2 = new - ref, scaled by 1 / (len N): row 0 [0, -1/4], row 1 [1/2]
    assert batch["logprobs"].grad[0].tolist() == pytest.approx([0.0, -0.25])
    assert batch["logprobs"].grad[1, 0].item() == pytest.approx(0.5)
    assert not batch["logprobs"].grad.isnan().any()


def test_grpo_rejects_per_token_advantages_and_unknown_estimators() -> None:
    batch = _two_sequences()
    batch["advantages"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 2\), expected \(N,\)"):
        grpo_loss(**batch)
    with pytest.raises(ValueError, match="use one of k1, k2, k3"):
        grpo_loss(**_two_sequences(), kl_estimator="low_var_kl")
    with pytest.raises(ValueError, match="use one of token-mean"):
        grpo_loss(**_two_sequences(), loss_agg_mode="mean")


def test_reinforce_pp_loss_is_the_token_mean_surrogate_on_per_token_advantages() -> None:
    batch = _two_sequences()
    advantages = torch.tensor([[1.0, 3.0], [-2.0, NAN]], dtype=torch.float64)
    loss, _ = reinforce_pp_loss(batch["logprobs"], batch["old_logprobs"], advantages, batch["response_mask"])
    # on-policy: -(1 + 3 - 2) / 3 tokens
    assert loss.item() == pytest.approx(-2 / 3)
    loss.backward()  # d/dlogprob = -A / 3 on real tokens; the NaN advantage on padding stays out
    assert batch["logprobs"].grad.flatten().tolist() == pytest.approx([-1 / 3, -1.0, 2 / 3, 0.0])
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\), expected \(N, T\)"):
        reinforce_pp_loss(
            batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["response_mask"]
        )


def test_clipped_value_loss_worked_example() -> None:
    # token 0: V = 1.5, old 1.0, R = 2: unclipped (1.5 - 2)^2 = 0.25;
    #          clipped V = 1.2: (1.2 - 2)^2 = 0.64 -> max 0.64
    # token 1: V = 1.1, old 1.0, R = 2: both 0.81 -> 0.81
    # token-mean of 0.5 * max: 0.5 * (0.64 + 0.81) / 2 = 0.3625
    values = torch.tensor([[1.5, 1.1, 7.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.3625)
    loss.backward()
    # token 0: the clipped branch is constant in V -> 0; token 1: 0.5 * 2 (1.1 - 2) / 2 tokens = -0.45
    assert values.grad[0].tolist() == pytest.approx([0.0, -0.45, 0.0])
    assert metrics["critic/vf_clip_frac"].item() == pytest.approx(0.5)
