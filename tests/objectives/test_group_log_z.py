"""The group estimate of log Z (flowrl.objectives.flowrl.group_log_z): worked examples, the optimum it
sits at, and the gradient argument of its docstring (detaching it changes no policy gradient)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from flowrl.objectives import OBJECTIVES
from flowrl.objectives.flowrl import (
    IMPORTANCE_WEIGHT_MODES,
    flowrl_loss,
    group_log_z,
    group_log_z_terms,
    sequence_importance_weight,
    weighted_mean_by_group,
)
from flowrl.objectives.masked import masked_mean, masked_sum

NAN = float("nan")


def _worked_batch() -> dict[str, torch.Tensor]:
    # Two prompts x two samples, beta = 2. Per sample, the target t = beta * adv + ell_ref - ell
    # (the log_z that zeroes its residual):
    #   a: logprobs [-1, -3]  ell -2   ref [-2, -2]  ell_ref -2   adv  0.5   t =  1 - 2 + 2 =  1
    #   b: logprobs [-4, pad] ell -4   ref [-1, pad] ell_ref -1   adv -0.5   t = -1 - 1 + 4 =  2
    #   c: logprobs [-1, -1]  ell -1   ref [-1, -3]  ell_ref -2   adv  1     t =  2 - 2 + 1 =  1
    #   d: logprobs [-2, -2]  ell -2   ref [-2, -2]  ell_ref -2   adv -1     t = -2 - 2 + 2 = -2
    # old_logprobs: b's single token is log 3 lower, so b's log_w = log 3 (w = 3 unclamped); a, c, d
    # are on-policy (w = 1). ell_old = [-2, -4 - log 3, -1, -2].
    log3 = math.log(3.0)
    return {
        "logprobs": torch.tensor(
            [[-1.0, -3.0], [-4.0, NAN], [-1.0, -1.0], [-2.0, -2.0]], dtype=torch.float64
        ),
        "old_logprobs": torch.tensor(
            [[-1.0, -3.0], [-4.0 - log3, NAN], [-1.0, -1.0], [-2.0, -2.0]], dtype=torch.float64
        ),
        "ref_logprobs": torch.tensor(
            [[-2.0, -2.0], [-1.0, NAN], [-1.0, -3.0], [-2.0, -2.0]], dtype=torch.float64
        ),
        "advantages": torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64),
        "response_mask": torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]),
    }


@pytest.mark.parametrize(
    ("options", "first", "second"),
    [
        # w = 1: plain means, (1 + 2) / 2 and (1 - 2) / 2
        ({"importance_weight": "on_policy"}, 1.5, -0.5),
        # w_b = 3 (under the default cap of 10): (1 * 1 + 3 * 2) / 4
        ({}, 7 / 4, -0.5),
        ({"importance_weight": "none"}, 7 / 4, -0.5),
        # the cap at 2: (1 + 2 * 2) / 3
        ({"importance_weight": "clamp", "max_importance_weight": 2.0}, 5 / 3, -0.5),
        # clipped to 1 + 0.2: (1 + 1.2 * 2) / 2.2
        ({"importance_weight": "clip", "clip_eps": 0.2}, 3.4 / 2.2, -0.5),
        # length-weighted (lengths 2, 1 and 2, 2), w = 1: (2 * 1 + 1 * 2) / 3 and (2 - 4) / 4
        ({"importance_weight": "on_policy", "sequence_weighting": "length"}, 4 / 3, -0.5),
        # pi_old in the residual: b's t = -1 + (-4 - log 3) + 4 = -1 - log 3; a, c, d use ell_old = ell:
        # a: 1 - 2 + 2 = 1, c: 2 - 1 + 1 = 2, d: -2 - 2 + 2 = -2
        ({"importance_weight": "on_policy", "reference": "old"}, (1 - 1 - math.log(3)) / 2, 0.0),
    ],
)
def test_worked_example(options: dict, first: float, second: float) -> None:
    log_z = group_log_z(**_worked_batch(), num_samples_per_prompt=2, beta=2.0, **options)
    torch.testing.assert_close(log_z, torch.tensor([first, first, second, second], dtype=torch.float64))


def test_worked_example_loss_is_the_within_group_variance() -> None:
    # At log_z = [1.5, 1.5, -0.5, -0.5] the residuals log_z - t are [0.5, -0.5, -1.5, 1.5]: the loss is
    # (0.25 + 0.25 + 2.25 + 2.25) / 4 = 1.25, the mean of the groups' variances of t (0.25 and 2.25).
    batch = _worked_batch()
    options = dict(beta=2.0, importance_weight="on_policy")
    log_z = group_log_z(**batch, num_samples_per_prompt=2, **options)
    loss, metrics = flowrl_loss(**batch, log_z=log_z, **options)
    assert loss.item() == pytest.approx(1.25, abs=1e-12)
    assert metrics["flowrl/residual"].item() == pytest.approx(0.0, abs=1e-12)  # zero mean in each group


def test_left_out_samples_do_not_count() -> None:
    batch = _worked_batch()
    batch["advantages"][1] = NAN  # a failed reward: no r_hat at all
    valid = torch.tensor([True, False, True, True])
    log_z = group_log_z(**batch, num_samples_per_prompt=2, beta=2.0, valid=valid)
    # group 0 keeps only a (its own target 1: residual 0, no gradient); group 1 is unchanged
    torch.testing.assert_close(log_z, torch.tensor([1.0, 1.0, -0.5, -0.5], dtype=torch.float64))
    none_valid = group_log_z(**batch, num_samples_per_prompt=2, beta=2.0, valid=torch.tensor([False] * 4))
    assert torch.equal(none_valid, torch.zeros(4, dtype=torch.float64))


def test_result_has_no_gradient_history(make_batch) -> None:
    b = make_batch()
    log_z = group_log_z(
        b["logprobs"], b["old_logprobs"], b["ref_logprobs"], b["rewards"], b["response_mask"],
        num_samples_per_prompt=4,
    )  # fmt: skip
    assert b["logprobs"].requires_grad and not log_z.requires_grad and log_z.grad_fn is None


def test_bad_group_size_names_the_fix() -> None:
    with pytest.raises(ValueError, match="num_samples_per_prompt=3 must be a positive divisor"):
        group_log_z(**_worked_batch(), num_samples_per_prompt=3)
    with pytest.raises(ValueError, match="exactly one of num_samples_per_prompt .* and group_ids"):
        group_log_z(**_worked_batch())
    with pytest.raises(ValueError, match="exactly one of"):
        group_log_z(**_worked_batch(), num_samples_per_prompt=2, group_ids=torch.tensor([0, 0, 1, 1]))


def test_group_ids_in_any_order_equal_contiguous_groups() -> None:
    # verl's groups: an id per sample (its uid), rows of one group anywhere in the batch
    batch = _worked_batch()
    contiguous = group_log_z(**batch, num_samples_per_prompt=2, beta=2.0)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = {k: v[order] for k, v in batch.items()}
    by_id = group_log_z(**shuffled, group_ids=torch.tensor([7, 3, 7, 3]), beta=2.0)
    torch.testing.assert_close(by_id, contiguous[order])
    # ids of any integer values; a group of its own gets its sample's own target
    alone = group_log_z(
        **batch, group_ids=torch.tensor([5, 9, 1, 1]), beta=2.0, importance_weight="on_policy"
    )
    torch.testing.assert_close(alone, torch.tensor([1.0, 2.0, -0.5, -0.5], dtype=torch.float64))


def test_terms_then_the_grouped_mean_is_the_estimate() -> None:
    # The split an engine uses when a group's samples sit on several processes: per-sample (target,
    # weight) computed where the samples are, the weighted mean once they are gathered.
    batch = _worked_batch()
    target, weight = group_log_z_terms(**batch, beta=2.0)
    torch.testing.assert_close(target, torch.tensor([1.0, 2.0, 1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(weight, torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    ids = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(
        weighted_mean_by_group(target, weight, ids), group_log_z(**batch, group_ids=ids, beta=2.0)
    )
    # a left-out sample: weight 0, its NaN target ignored; a group of weight 0 gets 0
    target[1] = NAN
    got = weighted_mean_by_group(target, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), ids)
    assert torch.equal(got, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="must all be"):
        weighted_mean_by_group(target, weight, torch.tensor([0, 1]))


def test_options_are_the_losses_so_the_weights_match() -> None:
    def keyword_only(fn) -> set[str]:
        params = inspect.signature(fn).parameters.values()
        return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    assert keyword_only(group_log_z) == keyword_only(flowrl_loss) - {"normalizer"} | {
        "num_samples_per_prompt",
        "group_ids",
        "valid",
    }
    assert keyword_only(group_log_z_terms) == keyword_only(flowrl_loss) - {"normalizer"} | {"valid"}
    for fn in (group_log_z, group_log_z_terms):
        for name in keyword_only(flowrl_loss) - {"normalizer"}:  # and the same defaults
            assert (
                inspect.signature(fn).parameters[name].default
                == inspect.signature(flowrl_loss).parameters[name].default
            ), name


def test_registry_builds_a_head_only_in_head_mode() -> None:
    assert OBJECTIVES["flowrl"].needs_log_z_head("head")
    assert not OBJECTIVES["flowrl"].needs_log_z_head("group")
    assert OBJECTIVES["flowrl"].group_log_z_fn is group_log_z
    assert not any(OBJECTIVES[name].needs_log_z_head("head") for name in ("grpo", "dr_grpo", "reinforce_pp"))
    with pytest.raises(ValueError, match="log_z.mode='heads' is not one of head, group"):
        OBJECTIVES["flowrl"].needs_log_z_head("heads")


# --- the optimum and the gradient -----------------------------------------------------------------------

CASES = [
    dict(importance_weight=mode, sequence_weighting=weighting)
    for mode in IMPORTANCE_WEIGHT_MODES
    for weighting in ("mean", "length")
] + [dict(reference="old")]


def _loss(b: dict, log_z: torch.Tensor, **options) -> torch.Tensor:
    loss, _ = flowrl_loss(
        b["logprobs"], b["old_logprobs"], b["ref_logprobs"], log_z, b["rewards"], b["response_mask"],
        beta=3.0, max_importance_weight=2.0, **options,
    )  # fmt: skip
    return loss


def _estimate(b: dict, **options) -> torch.Tensor:
    return group_log_z(
        b["logprobs"], b["old_logprobs"], b["ref_logprobs"], b["rewards"], b["response_mask"],
        num_samples_per_prompt=4, beta=3.0, max_importance_weight=2.0, **options,
    )  # fmt: skip


@pytest.mark.parametrize("options", CASES)
def test_the_estimate_minimizes_each_groups_loss(make_batch, options: dict) -> None:
    # off_policy_scale 0.3: weights from about 0.3 to above the cap of 2, so the weighting matters
    b = make_batch(num_prompts=3, num_samples_per_prompt=4, seed=1)
    log_z = _estimate(b, **options).requires_grad_()
    loss = _loss(b, log_z, **options)
    (grad,) = torch.autograd.grad(loss, log_z)
    # stationary: d loss / d log_z summed over each group (what a per-prompt log Z receives) is 0
    torch.testing.assert_close(
        grad.view(3, 4).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # and a minimum: moving any one group's log Z either way raises the loss
    for g in range(3):
        for step in (-0.05, 0.05):
            moved = log_z.detach().clone()
            moved[4 * g : 4 * g + 4] += step
            assert _loss(b, moved, **options) > loss


@pytest.mark.parametrize("options", CASES)
def test_gradient_through_the_estimate_changes_nothing(make_batch, options: dict) -> None:
    """The envelope argument of the docstring: the estimate computed in the graph (gradient flowing
    through it) and detached give the same policy gradient, which is also the head mode's with the head
    at this optimum (log Z a leaf of the same value)."""
    b = make_batch(num_prompts=3, num_samples_per_prompt=4, seed=2)
    detached = _estimate(b, **options)
    (g_detached,) = torch.autograd.grad(_loss(b, detached, **options), b["logprobs"])

    # the same weighted group mean written out in the graph, the gradient flowing through ell
    mask = b["response_mask"]
    ell = masked_mean(b["logprobs"], mask, dim=-1)
    ref = b["ref_logprobs"] if options.get("reference", "ref") == "ref" else b["old_logprobs"]
    target = 3.0 * b["rewards"] + masked_mean(ref, mask, dim=-1) - ell
    mode = options.get("importance_weight", "clamp")
    log_w = masked_sum(b["logprobs"].detach() - b["old_logprobs"], mask, dim=-1)
    w = sequence_importance_weight(log_w, mode, max_importance_weight=2.0)
    if options.get("sequence_weighting") == "length":
        w = w * mask.sum(-1)
    in_graph = ((w * target).view(3, 4).sum(1) / w.view(3, 4).sum(1)).repeat_interleave(4)
    torch.testing.assert_close(in_graph.detach(), detached)
    (g_in_graph,) = torch.autograd.grad(_loss(b, in_graph, **options), b["logprobs"])
    torch.testing.assert_close(g_in_graph, g_detached, atol=1e-12, rtol=1e-10)

    head = detached.clone().requires_grad_()  # a head sitting at the optimum
    g_head, g_log_z = torch.autograd.grad(_loss(b, head, **options), (b["logprobs"], head))
    torch.testing.assert_close(g_head, g_detached, atol=1e-12, rtol=1e-10)
    # and the head itself is not pulled: its per-prompt gradient is 0
    torch.testing.assert_close(
        g_log_z.view(3, 4).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_a_mean_that_is_not_the_optimum_does_change_the_gradient(make_batch) -> None:
    # The converse: the plain (unweighted) group mean under importance weights w != 1 is not the loss's
    # minimizer, and then a gradient through it adds a term; this is why the weights must be the loss's
    # and why the estimate is detached rather than trusted to be exact.
    b = make_batch(num_prompts=3, num_samples_per_prompt=4, seed=2)
    mask = b["response_mask"]
    ell = masked_mean(b["logprobs"], mask, dim=-1)
    target = 3.0 * b["rewards"] + masked_mean(b["ref_logprobs"], mask, dim=-1) - ell
    plain = target.view(3, 4).mean(1).repeat_interleave(4)
    options = dict(importance_weight="none")
    (g_through,) = torch.autograd.grad(_loss(b, plain, **options), b["logprobs"])
    (g_detached,) = torch.autograd.grad(_loss(b, plain.detach(), **options), b["logprobs"])
    assert (g_through - g_detached).abs().max() > 1e-3
    log_z = plain.detach().requires_grad_()
    (grad,) = torch.autograd.grad(_loss(b, log_z, **options), log_z)
    assert grad.view(3, 4).sum(1).abs().min() > 1e-3  # not stationary: not the optimum


def test_equals_a_loop_over_groups_and_follows_a_permutation(make_batch) -> None:
    b = make_batch(num_prompts=3, num_samples_per_prompt=4, seed=3)
    log_z = _estimate(b, importance_weight="clamp")
    mask = b["response_mask"]
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        group = {k: v[rows] for k, v in b.items() if k != "lengths"}
        one = group_log_z(
            group["logprobs"], group["old_logprobs"], group["ref_logprobs"], group["rewards"], mask[rows],
            num_samples_per_prompt=4, beta=3.0, max_importance_weight=2.0,
        )  # fmt: skip
        torch.testing.assert_close(one, log_z[rows])
        assert torch.all(one == one[0])
    # prompts in another order: the same estimates, moved with their groups
    order = torch.tensor([2, 0, 1]).repeat_interleave(4) * 4 + torch.arange(4).repeat(3)
    permuted = {k: v[order] for k, v in b.items()}
    torch.testing.assert_close(_estimate(permuted, importance_weight="clamp"), log_z[order])
