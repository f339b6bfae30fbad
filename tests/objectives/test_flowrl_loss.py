"""The FlowRL loss (flowrl.objectives.flowrl): worked examples, properties, the spec written out."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowrl.objectives.flowrl import (
    IMPORTANCE_WEIGHT_MODES,
    flowrl_loss,
    importance_weight_clipped,
    sequence_importance_weight,
)

NAN = float("nan")


def _worked_batch() -> dict[str, torch.Tensor]:
    # Two responses: lengths 2 and 1 (the padded slot holds NaN).
    #   ell     = [(-1 - 3) / 2, -2]            = [-2, -2]
    #   ell_old = [(-1 - 3) / 2, -2.5]          = [-2, -2.5]
    #   ell_ref = [(-2 - 2) / 2, -1]            = [-2, -1]
    #   log_w   = [0 + 0, -2 + 2.5]             = [0, 0.5]
    # with log_z = [0.5, -0.5], advantages = [0.1, 0.2], beta = 10:
    #   delta = log_z + ell - beta * adv - ell_ref = [0.5 - 2 - 1 + 2, -0.5 - 2 - 2 + 1] = [-0.5, -3.5]
    #   delta^2 = [0.25, 12.25]
    return {
        "logprobs": torch.tensor([[-1.0, -3.0], [-2.0, NAN]], dtype=torch.float64, requires_grad=True),
        "old_logprobs": torch.tensor([[-1.0, -3.0], [-2.5, NAN]], dtype=torch.float64),
        "ref_logprobs": torch.tensor([[-2.0, -2.0], [-1.0, NAN]], dtype=torch.float64),
        "log_z": torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True),
        "advantages": torch.tensor([0.1, 0.2], dtype=torch.float64),
        "response_mask": torch.tensor([[1, 1], [1, 0]]),
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # w = [1, exp(0.5) = 1.648721]: (0.25 + 1.648721 * 12.25) / 2
        ({"importance_weight": "none"}, (0.25 + math.exp(0.5) * 12.25) / 2),
        # clamp at 1.5: w = [1, 1.5]: (0.25 + 18.375) / 2 = 9.3125
        ({"importance_weight": "clamp", "max_importance_weight": 1.5}, 9.3125),
        # default clamp at 10 leaves exp(0.5) alone
        ({}, (0.25 + math.exp(0.5) * 12.25) / 2),
        # clip to [0.8, 1.2]: w = [1, 1.2]: (0.25 + 14.7) / 2 = 7.475
        ({"importance_weight": "clip", "clip_eps": 0.2}, 7.475),
        # w = 1: (0.25 + 12.25) / 2 = 6.25
        ({"importance_weight": "on_policy"}, 6.25),
        # length-weighted (lengths [2, 1]), w = 1: (2 * 0.25 + 1 * 12.25) / 3 = 4.25
        ({"importance_weight": "on_policy", "sequence_weighting": "length"}, 4.25),
        # pi_old in the residual: delta = [0.5 - 2 - 1 + 2, -0.5 - 2 - 2 + 2.5] = [-0.5, -2]; (0.25 + 4) / 2
        ({"importance_weight": "on_policy", "reference": "old"}, 2.125),
    ],
)
def test_worked_example(options: dict, expected: float) -> None:
    loss, _ = flowrl_loss(**_worked_batch(), beta=10.0, **options)
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_worked_example_metrics() -> None:
    _, metrics = flowrl_loss(
        **_worked_batch(), beta=10.0, importance_weight="clamp", max_importance_weight=1.5
    )

    def k3(x: float) -> float:  # exp(q - p) - (q - p) - 1 for x = q - p
        return math.exp(x) - x - 1

    expected = {
        "flowrl/ell": -2.0,
        "flowrl/ell_old": -2.25,
        "flowrl/ell_ref": -1.5,
        "flowrl/log_z": 0.0,
        "flowrl/r_hat_abs": 0.15,  # mean |advantages|
        "flowrl/residual": -2.0,  # (-0.5 - 3.5) / 2
        "flowrl/residual_abs": 2.0,
        "flowrl/importance_weight_raw": (1 + math.exp(0.5)) / 2,
        "flowrl/importance_weight": (1 + 1.5) / 2,
        "flowrl/importance_weight_clipped_frac": 0.5,  # log_w 0.5 > log 1.5: the second is capped
        # k3 per real token, averaged over the 3 of them; q - p = old - new = [0, 0, -0.5]
        "actor/ppo_kl": (0 + 0 + k3(-0.5)) / 3,
        # q - p = ref - new = [-1, 1, 1]
        "actor/ref_kl": (k3(-1.0) + k3(1.0) + k3(1.0)) / 3,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad, name
        assert metrics[name].item() == pytest.approx(value, abs=1e-9), name


def _spec_loss(batch: dict[str, torch.Tensor], **options) -> torch.Tensor:
    """docs/algorithm.md section 1 written out one sequence at a time on the real tokens only (no masks)."""
    beta = options.get("beta", 15.0)
    mode = options.get("importance_weight", "clamp")
    max_w = options.get("max_importance_weight", 10.0)
    eps = options.get("clip_eps", 0.2)
    terms, lengths = [], []
    for i in range(batch["log_z"].shape[0]):
        length = int(batch["response_mask"][i].sum())
        new = batch["logprobs"][i, :length]
        old = batch["old_logprobs"][i, :length]
        ref = old if options.get("reference", "ref") == "old" else batch["ref_logprobs"][i, :length]
        delta = batch["log_z"][i] + new.mean() - beta * batch["advantages"][i] - ref.mean()
        raw_w = torch.exp((new - old).sum()).detach()
        w = {
            "clamp": torch.clamp(raw_w, max=max_w),
            "clip": torch.clamp(raw_w, 1 - eps, 1 + eps),
            "none": raw_w,
            "on_policy": torch.ones_like(raw_w),
        }[mode]
        terms.append(w * delta**2)
        lengths.append(length)
    if options.get("sequence_weighting", "mean") == "length":
        return sum(n * t for n, t in zip(lengths, terms, strict=True)) / sum(lengths)
    return sum(terms) / len(terms)


def _random_batch(make_batch, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    batch = make_batch(seed=seed, off_policy_scale=0.5, **kwargs)
    advantages = torch.randn(
        batch["log_z"].shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )
    return {
        "logprobs": batch["logprobs"],
        "old_logprobs": batch["old_logprobs"],
        "ref_logprobs": batch["ref_logprobs"],
        "log_z": batch["log_z"],
        "advantages": advantages,
        "response_mask": batch["response_mask"],
    }


def _loss_and_grads(loss_fn, batch, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = loss_fn(batch, **options)
    loss = out[0] if isinstance(out, tuple) else out
    logprobs_grad, log_z_grad = torch.autograd.grad(loss, [batch["logprobs"], batch["log_z"]])
    return loss.detach(), logprobs_grad, log_z_grad


SWITCHES = list(itertools.product(IMPORTANCE_WEIGHT_MODES, ("ref", "old"), ("mean", "length")))


@pytest.mark.parametrize(("mode", "reference", "weighting"), SWITCHES)
def test_vectorized_loss_equals_the_spec_loop(make_batch, mode: str, reference: str, weighting: str) -> None:
    batch = _random_batch(make_batch)
    options = {
        "beta": 2.0,
        "importance_weight": mode,
        "max_importance_weight": 1.5,  # low enough that some sequences hit the cap
        "clip_eps": 0.2,
        "reference": reference,
        "sequence_weighting": weighting,
    }
    log_w = torch.stack(
        [
            (batch["logprobs"][i] - batch["old_logprobs"][i])[batch["response_mask"][i]].sum()
            for i in range(batch["log_z"].shape[0])
        ]
    )
    assert (log_w.exp() > 1.5).any() and (log_w.exp() < 0.8).any()  # the caps and clips are exercised
    expected = _loss_and_grads(_spec_loss, batch, **options)
    actual = _loss_and_grads(lambda b, **o: flowrl_loss(**b, **o), batch, **options)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not actual[1].isnan().any()
    assert actual[1][~batch["response_mask"]].abs().max().item() == 0.0  # no gradient into padding


@pytest.mark.parametrize("mode", IMPORTANCE_WEIGHT_MODES)
def test_zero_residual_gives_zero_loss_and_zero_gradient(make_batch, mode: str) -> None:
    batch = _random_batch(make_batch)
    mask = batch["response_mask"]
    ell = torch.stack([batch["logprobs"][i][mask[i]].mean() for i in range(mask.shape[0])]).detach()
    ell_ref = torch.stack([batch["ref_logprobs"][i][mask[i]].mean() for i in range(mask.shape[0])])
    beta = 15.0
    batch["log_z"] = (beta * batch["advantages"] + ell_ref - ell).requires_grad_()
    loss, logprobs_grad, log_z_grad = _loss_and_grads(
        lambda b, **o: flowrl_loss(**b, **o), batch, beta=beta, importance_weight=mode
    )
    assert abs(loss.item()) < 1e-20
    assert logprobs_grad.abs().max().item() < 1e-12 and log_z_grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("mode", IMPORTANCE_WEIGHT_MODES)
def test_gradients_match_the_closed_form_with_a_detached_weight(make_batch, mode: str) -> None:
    # loss = (1/N) sum_i w_i delta_i^2 with w detached and d delta_i / d logprobs_it = 1 / len_i, so
    #   d loss / d log_z_i     = 2 w_i delta_i / N
    #   d loss / d logprobs_it = 2 w_i delta_i / (N len_i) on real tokens
    # (a weight that kept its gradient would add w_i delta_i^2 / N to every real token)
    batch = _random_batch(make_batch)
    mask = batch["response_mask"]
    n = mask.shape[0]
    options = {"beta": 3.0, "importance_weight": mode, "max_importance_weight": 1.5}
    loss, logprobs_grad, log_z_grad = _loss_and_grads(lambda b, **o: flowrl_loss(**b, **o), batch, **options)
    lengths = mask.sum(dim=1).to(torch.float64)
    ell = torch.where(mask, batch["logprobs"], 0).sum(1).detach() / lengths
    ell_ref = torch.where(mask, batch["ref_logprobs"], 0).sum(1) / lengths
    delta = batch["log_z"].detach() + ell - 3.0 * batch["advantages"] - ell_ref
    log_w = torch.where(mask, batch["logprobs"].detach() - batch["old_logprobs"], 0).sum(1)
    w = sequence_importance_weight(log_w, mode, max_importance_weight=1.5)
    torch.testing.assert_close(log_z_grad, 2 * w * delta / n)
    expected_token_grad = torch.where(mask, (2 * w * delta / (n * lengths)).unsqueeze(1), 0.0)
    torch.testing.assert_close(logprobs_grad, expected_token_grad)


def test_importance_weight_modes() -> None:
    log_w = torch.tensor([-3.0, -0.1, 0.0, 0.1, 2.0, 5.0], requires_grad=True)
    raw = log_w.detach().exp()
    clamp = sequence_importance_weight(log_w, "clamp", max_importance_weight=2.0)
    clip = sequence_importance_weight(log_w, "clip", clip_eps=0.2)
    none = sequence_importance_weight(log_w, "none")
    on_policy = sequence_importance_weight(log_w, "on_policy")
    for w in (clamp, clip, none, on_policy):
        assert not w.requires_grad  # all detached: no gradient through w
    torch.testing.assert_close(clamp, torch.clamp(raw, max=2.0))  # caps at the max, exp below it
    assert clamp.max().item() == pytest.approx(2.0)
    torch.testing.assert_close(clip, torch.clamp(raw, 0.8, 1.2))
    assert clip.min().item() >= 0.8 - 1e-6 and clip.max().item() <= 1.2 + 1e-6
    torch.testing.assert_close(none, raw)
    assert none.max().item() > 100  # unbounded: exp(5) = 148.4
    assert on_policy.tolist() == [1.0] * 6


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # log_w = [0, 0.5]
        ({"importance_weight": "clamp", "max_importance_weight": 1.5}, 0.5),  # 0.5 > log 1.5 = 0.405
        ({"importance_weight": "clamp"}, 0.0),  # log 10 = 2.30: nothing capped
        ({"importance_weight": "clip", "clip_eps": 0.2}, 0.5),  # [log 0.8, log 1.2] = [-0.223, 0.182]
        ({"importance_weight": "clip", "clip_eps": 0.9}, 0.0),  # [log 0.1, log 1.9] = [-2.30, 0.642]
        ({"importance_weight": "none"}, 0.0),  # no bound
        ({"importance_weight": "on_policy"}, 0.0),  # w = 1, log_w is not used
    ],
)
def test_importance_weight_clipped_frac_worked_example(options: dict, expected: float) -> None:
    _, metrics = flowrl_loss(**_worked_batch(), beta=10.0, **options)
    assert metrics["flowrl/importance_weight_clipped_frac"].item() == expected


def test_importance_weight_clipped_marks_exactly_the_changed_weights() -> None:
    # at the bound itself (log 1 = 0 for a cap of 1) the weight is unchanged, so not clipped
    log_w = torch.tensor([-3.0, -0.1, 0.0, 0.1, 2.0, 5.0], dtype=torch.float64)
    assert importance_weight_clipped(log_w, "clamp", max_importance_weight=1.0).tolist() == [
        False, False, False, True, True, True
    ]  # fmt: skip
    assert importance_weight_clipped(log_w, "clip", clip_eps=0.5).tolist() == [
        True, False, False, False, True, True
    ]  # fmt: skip
    for mode in ("none", "on_policy"):
        assert not importance_weight_clipped(log_w, mode).any()
    log_w = torch.randn(1000, dtype=torch.float64) * 2
    for mode, options in (("clamp", {"max_importance_weight": 2.0}), ("clip", {"clip_eps": 0.2})):
        weight = sequence_importance_weight(log_w, mode, **options)
        changed = ~torch.isclose(weight, log_w.exp(), rtol=1e-12, atol=0.0)
        assert torch.equal(importance_weight_clipped(log_w, mode, **options), changed), mode


def test_clamp_does_not_overflow_and_the_raw_metric_saturates() -> None:
    batch = _worked_batch()
    batch["old_logprobs"] = batch["old_logprobs"] - 1000.0  # log_w = 2000 and 1000.5: exp overflows
    loss, metrics = flowrl_loss(**batch, beta=10.0, importance_weight="clamp")
    # w = 10 for both: (10 * 0.25 + 10 * 12.25) / 2 = 62.5
    assert loss.item() == pytest.approx(62.5)
    assert metrics["flowrl/importance_weight"].item() == pytest.approx(10.0)
    assert metrics["flowrl/importance_weight_clipped_frac"].item() == 1.0
    assert math.isfinite(metrics["flowrl/importance_weight_raw"].item())
    assert metrics["flowrl/importance_weight_raw"].item() > 1e300


def test_garbage_padding_changes_nothing(make_batch) -> None:
    batch = _random_batch(make_batch)
    padded = dict(batch)
    extra = torch.tensor([[NAN, float("inf"), -1e30]], dtype=torch.float64).expand(batch["log_z"].shape[0], 3)
    padded["logprobs"] = torch.cat([batch["logprobs"].detach(), extra], dim=1).requires_grad_()
    padded["old_logprobs"] = torch.cat([batch["old_logprobs"], extra.flip(1)], dim=1)
    padded["ref_logprobs"] = torch.cat([batch["ref_logprobs"], -extra], dim=1)
    padded["response_mask"] = torch.cat(
        [batch["response_mask"], torch.zeros(extra.shape, dtype=torch.bool)], 1
    )
    for weighting in ("mean", "length"):
        loss, metrics = flowrl_loss(**batch, sequence_weighting=weighting)
        padded_loss, padded_metrics = flowrl_loss(**padded, sequence_weighting=weighting)
        torch.testing.assert_close(padded_loss, loss)
        for name in metrics:
            torch.testing.assert_close(padded_metrics[name], metrics[name], msg=name)
        (grad,) = torch.autograd.grad(loss, batch["logprobs"])
        (padded_grad,) = torch.autograd.grad(padded_loss, padded["logprobs"])
        torch.testing.assert_close(padded_grad[:, : grad.shape[1]], grad)
        assert padded_grad[:, grad.shape[1] :].abs().max().item() == 0.0


def test_permuting_whole_groups_changes_nothing(make_batch) -> None:
    batch = _random_batch(make_batch, num_prompts=3, num_samples_per_prompt=4)
    order = torch.tensor([2, 0, 1]).repeat_interleave(4) * 4 + torch.arange(4).repeat(3)
    permuted = {name: value.detach()[order] for name, value in batch.items()}
    permuted["logprobs"].requires_grad_()
    permuted["log_z"].requires_grad_()
    for weighting in ("mean", "length"):
        loss, logprobs_grad, log_z_grad = _loss_and_grads(
            lambda b, **o: flowrl_loss(**b, **o), batch, sequence_weighting=weighting
        )
        p_loss, p_logprobs_grad, p_log_z_grad = _loss_and_grads(
            lambda b, **o: flowrl_loss(**b, **o), permuted, sequence_weighting=weighting
        )
        torch.testing.assert_close(p_loss, loss)
        torch.testing.assert_close(p_log_z_grad, log_z_grad[order])
        torch.testing.assert_close(p_logprobs_grad, logprobs_grad[order])


def test_log_z_is_not_detached_and_gets_the_gradient_of_the_loss() -> None:
    batch = _worked_batch()
    loss, _ = flowrl_loss(**batch, beta=10.0, importance_weight="on_policy")
    loss.backward()
    # d loss / d log_z = 2 w delta / N = [2 * -0.5 / 2, 2 * -3.5 / 2] = [-0.5, -3.5]
    assert batch["log_z"].grad.tolist() == pytest.approx([-0.5, -3.5])


def test_metrics_describe_the_batch_whatever_the_normalizer(make_batch) -> None:
    batch = _random_batch(make_batch)
    _, metrics = flowrl_loss(**batch, sequence_weighting="length")
    _, normalized_metrics = flowrl_loss(**batch, sequence_weighting="length", normalizer=1000.0)
    for name, value in metrics.items():
        torch.testing.assert_close(normalized_metrics[name], value, msg=name)


def test_normalizer_divides_the_summed_terms() -> None:
    # on-policy terms [0.25, 12.25]: sum 12.5 / normalizer 5 = 2.5; length-weighted: (0.5 + 12.25) / 5
    batch = _worked_batch()
    loss, _ = flowrl_loss(**batch, beta=10.0, importance_weight="on_policy", normalizer=5.0)
    assert loss.item() == pytest.approx(2.5)
    loss, _ = flowrl_loss(
        **batch, beta=10.0, importance_weight="on_policy", sequence_weighting="length", normalizer=5.0
    )
    assert loss.item() == pytest.approx(12.75 / 5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"importance_weight": "clipped"},
            "unknown importance_weight 'clipped'; use one of clamp, clip, none, on_policy",
        ),
        ({"reference": "reference"}, "unknown reference 'reference'; use one of ref, old"),
        ({"sequence_weighting": "sum"}, "unknown sequence_weighting 'sum'; use one of mean, length"),
        (
            {"importance_weight": "clamp", "max_importance_weight": 0.0},
            "max_importance_weight must be positive",
        ),
        ({"importance_weight": "clip", "clip_eps": 1.5}, r"clip_eps must be in \(0, 1\)"),
    ],
)
def test_bad_options_name_the_fix(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flowrl_loss(**_worked_batch(), **options)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("log_z", torch.zeros(2, 1), r"log_z has shape \(2, 1\), expected \(N,\) = \(2,\)"),
        ("advantages", torch.zeros(3), r"advantages has shape \(3,\), expected \(N,\) = \(2,\)"),
        ("ref_logprobs", torch.zeros(2, 3), r"ref_logprobs has shape \(2, 3\), expected \(N, T\) = \(2, 2\)"),
    ],
)
def test_mismatched_shapes_name_the_argument(name: str, value: torch.Tensor, message: str) -> None:
    batch = _worked_batch()
    batch[name] = value
    with pytest.raises(ValueError, match=message):
        flowrl_loss(**batch)
