"""Masked reductions and loss aggregation (flowrl.objectives.masked)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from flowrl.objectives.masked import (
    LOSS_AGG_MODES,
    aggregate_loss,
    check_batch_shapes,
    count_units,
    kl_k3,
    masked_kl_k3,
    masked_mean,
    masked_sum,
    masked_whiten,
    mean_over_sequences,
    sequence_lengths,
)

NAN = float("nan")

# Two sequences: lengths 3 and 1, padding holds NaN and inf.
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, float("inf")]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_masked_sum_and_mean_worked_example() -> None:
    # all real entries: 1 + 2 + 3 + 4 = 10 over 4 tokens; rows: 6 / 3 = 2 and 4 / 1 = 4
    assert masked_sum(VALUES, MASK).item() == 10.0
    assert masked_mean(VALUES, MASK).item() == 2.5
    assert masked_sum(VALUES, MASK, dim=-1).tolist() == [6.0, 4.0]
    assert masked_mean(VALUES, MASK, dim=-1).tolist() == [2.0, 4.0]


def test_empty_row_reduces_to_zero_not_nan() -> None:
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert masked_mean(VALUES, mask, dim=-1).tolist() == [2.0, 0.0]


def test_garbage_padding_gets_zero_gradient() -> None:
    values = VALUES.clone().requires_grad_()
    masked_mean(values, MASK, dim=-1).sum().backward()
    # d/dx of the row means: 1/3 on each token of row 0, 1 on the single real token of row 1
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected)


def test_mask_broadcasts_over_a_trailing_feature_dimension() -> None:
    values = torch.arange(12, dtype=torch.float64).view(2, 3, 2)  # (B, L, H)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]]).unsqueeze(-1)
    # row 0 averages positions 1 and 2: ([2, 3] + [4, 5]) / 2; row 1 keeps position 0: [6, 7]
    assert masked_mean(values, mask, dim=1).tolist() == [[3.0, 4.0], [6.0, 7.0]]


def test_sequence_lengths() -> None:
    assert sequence_lengths(MASK).tolist() == [3.0, 1.0]


def test_masked_whiten_has_zero_mean_unit_std_and_zero_padding() -> None:
    whitened = masked_whiten(VALUES, MASK)
    real = whitened[MASK.bool()]
    assert abs(real.mean().item()) < 1e-12
    assert real.std().item() == pytest.approx(1.0, abs=1e-6)  # unbiased std, as the whitening uses
    assert whitened[~MASK.bool()].tolist() == [0.0, 0.0]
    # independent check: (x - mean) / stdev of [1, 2, 3, 4]
    mean, stdev = statistics.mean([1, 2, 3, 4]), statistics.stdev([1, 2, 3, 4])
    assert real.tolist() == pytest.approx([(x - mean) / stdev for x in [1, 2, 3, 4]], abs=1e-6)


def test_masked_whiten_of_a_constant_is_zero() -> None:
    values = torch.full((2, 3), 5.0)
    assert masked_whiten(values, MASK).abs().max().item() == 0.0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 10 / 4),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq-mean-token-mean", (2 + 4) / 2),  # row means 2 and 4
        ("seq-mean-token-sum", (6 + 4) / 2),  # row sums 6 and 4
        ("seq-mean-token-sum-norm", (6 / 3 + 4 / 3) / 2),  # row sums / T = 3
    ],
)
def test_aggregate_loss_worked_examples(mode: str, expected: float) -> None:
    assert aggregate_loss(VALUES, MASK, mode).item() == pytest.approx(expected)


def test_seq_mean_token_sum_norm_uses_the_given_max_response_length() -> None:
    # (6 / 8 + 4 / 8) / 2 = 0.625
    loss = aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", max_response_length=8)
    assert loss.item() == pytest.approx(0.625)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 10 / 8),  # summed tokens / normalizer
        ("seq-mean-token-mean", (2 + 4) / 8),  # summed row means / normalizer
        ("seq-mean-token-sum", (6 + 4) / 8),
    ],
)
def test_normalizer_replaces_the_local_unit_count(mode: str, expected: float) -> None:
    assert aggregate_loss(VALUES, MASK, mode, normalizer=8.0).item() == pytest.approx(expected)


def test_count_units_matches_the_local_denominator() -> None:
    assert count_units(MASK, "token-mean") == 4.0
    for mode in LOSS_AGG_MODES[1:]:
        assert count_units(MASK, mode) == 2.0
        # passing the local count as normalizer changes nothing
        plain = aggregate_loss(VALUES, MASK, mode)
        assert aggregate_loss(VALUES, MASK, mode, normalizer=count_units(MASK, mode)).item() == plain.item()


def test_mean_over_sequences_plain_weighted_and_normalized() -> None:
    values = torch.tensor([1.0, 3.0])
    weights = torch.tensor([1.0, 3.0])
    assert mean_over_sequences(values).item() == 2.0
    assert mean_over_sequences(values, weights=weights).item() == pytest.approx((1 + 9) / 4)
    assert mean_over_sequences(values, normalizer=8.0).item() == pytest.approx(4 / 8)
    assert mean_over_sequences(values, weights=weights, normalizer=8.0).item() == pytest.approx(10 / 8)


def test_unknown_loss_agg_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate_loss(VALUES, MASK, "sequence-mean")
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'tokens'"):
        count_units(MASK, "tokens")


def test_bad_shapes_and_normalizer_are_named() -> None:
    with pytest.raises(ValueError, match=r"values have shape \(2, 2\).*mask has \(2, 3\)"):
        aggregate_loss(VALUES[:, :2], MASK, "token-mean")
    with pytest.raises(ValueError, match="normalizer must be a positive unit count"):
        aggregate_loss(VALUES, MASK, "token-mean", normalizer=0.0)
    with pytest.raises(ValueError, match="one weight per sequence"):
        mean_over_sequences(torch.ones(2), weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"log_z has shape \(2, 1\), expected \(N,\) = \(2,\)"):
        check_batch_shapes(MASK, per_sequence={"log_z": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(3, 3\), expected \(N, T\) = \(2, 3\)"):
        check_batch_shapes(MASK, per_token={"old_logprobs": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="response_mask must be"):
        check_batch_shapes(MASK[0])


# ---------------------------------------------------------------------------------------------
# The k3 KL estimator behind actor/ppo_kl and actor/ref_kl


def test_k3_worked_value() -> None:
    # p = log 1/2 (current), q = log 1/4 (other): q - p = -log 2, k3 = 1/2 + log 2 - 1 = 0.193147
    p = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    q = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    assert kl_k3(p, q).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-12)
    assert masked_kl_k3(p, q, torch.ones(1, 1)).item() == pytest.approx(0.193147, abs=1e-6)


def test_k3_is_nonnegative_and_zero_exactly_at_equality() -> None:
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1e-2, 1.0, 20.0):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            p = (-torch.rand(64, 32, generator=gen, dtype=torch.float64) * 5).to(dtype)
            q = (p.double() + scale * torch.randn(64, 32, generator=gen, dtype=torch.float64)).to(dtype)
            per_token = kl_k3(p, q)
            assert per_token.min().item() >= 0.0, (scale, dtype)
            # 0 where the log-probs agree, positive where they differ (k3 ~ d^2 / 2 rounds to 0 below
            # about the square root of the dtype's resolution, so "differ" means beyond that)
            assert (per_token[p == q] == 0).all(), (scale, dtype)
            resolved = (p.double() - q.double()).abs() > 10 * torch.finfo(dtype).eps ** 0.5
            assert (per_token[resolved] > 0).all(), (scale, dtype)
            assert kl_k3(p, p).abs().max().item() == 0.0
    mask = torch.ones(3, 4)
    p = -torch.rand(3, 4, generator=gen)
    assert masked_kl_k3(p, p.clone(), mask).item() == 0.0
    q = p.clone()
    q[1, 2] -= 0.3  # one token differs: the mean is positive
    assert masked_kl_k3(p, q, mask).item() > 0.0


def test_k3_expectation_is_the_exact_kl_of_a_categorical() -> None:
    # pi (current) and pi_q (old or reference) over four tokens; KL(pi || pi_q) = sum pi log(pi / pi_q)
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    pi_q = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64)
    exact = (pi * (pi / pi_q).log()).sum().item()  # 0.379686
    per_token = kl_k3(pi.log().unsqueeze(0), pi_q.log().unsqueeze(0)).squeeze(0)
    # the expectation under pi of the per-token estimate, summed out exactly: unbiased
    assert (pi * per_token).sum().item() == pytest.approx(exact, rel=1e-12)
    # and the masked mean over tokens sampled from pi converges to it
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    sampled = masked_kl_k3(
        pi.log()[samples].view(1, -1), pi_q.log()[samples].view(1, -1), torch.ones(1, 200_000)
    )
    assert sampled.item() == pytest.approx(exact, rel=0.01)
    # the old estimate, the mean of q - p, is the negative of the KL in expectation (what was logged)
    assert (pi * (pi_q.log() - pi.log())).sum().item() == pytest.approx(-exact)


def test_masked_k3_ignores_padding_and_has_no_history() -> None:
    p = torch.tensor(
        [[-1.0, -2.0, NAN], [-0.5, float("inf"), -1e30]], dtype=torch.float64, requires_grad=True
    )
    q = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, NAN, 1e30]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    value = masked_kl_k3(p, q, mask)
    assert not value.requires_grad
    # real tokens: q - p = [-0.5, 0, -0.5]: 2 (e^-0.5 + 0.5 - 1) / 3
    assert value.item() == pytest.approx(2 * (math.exp(-0.5) - 0.5) / 3, abs=1e-12)


def test_kl_penalty_k3_is_the_same_helper() -> None:
    from flowrl.objectives.advantages import kl_penalty

    gen = torch.Generator().manual_seed(1)
    p, q = -torch.rand(4, 5, generator=gen), -torch.rand(4, 5, generator=gen)
    assert torch.equal(kl_penalty(p, q, "k3"), kl_k3(p, q))
