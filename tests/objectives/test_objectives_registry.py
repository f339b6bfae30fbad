"""The OBJECTIVES dict: what each objective needs, its advantage_fn, and micro-batch invariance."""

from __future__ import annotations

import inspect

import pytest
import torch

from flowrl.objectives import (
    LOSS_AGG_MODES,
    OBJECTIVES,
    group_normalized_rewards,
    reinforce_pp_advantages,
)

GROUP = 4


def test_the_registry_lists_flowrl_and_its_baselines() -> None:
    assert set(OBJECTIVES) == {"flowrl", "grpo", "dr_grpo", "reinforce_pp", "ppo"}
    for name, objective in OBJECTIVES.items():
        assert objective.name == name
    assert [name for name, o in OBJECTIVES.items() if o.uses_log_z] == ["flowrl"]
    assert [name for name, o in OBJECTIVES.items() if o.needs_values] == ["ppo"]
    assert OBJECTIVES["flowrl"].uses_ref_logprobs and OBJECTIVES["grpo"].uses_ref_logprobs
    assert not OBJECTIVES["reinforce_pp"].uses_ref_logprobs
    assert OBJECTIVES["reinforce_pp"].advantage_uses_ref_logprobs


def _advantage_inputs(make_batch) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    batch = make_batch(num_prompts=2, num_samples_per_prompt=GROUP)
    return batch, (batch["rewards"], batch["response_mask"], batch["old_logprobs"], batch["ref_logprobs"])


def test_advantage_functions_wrap_the_estimators(make_batch) -> None:
    batch, args = _advantage_inputs(make_batch)
    rewards = batch["rewards"]
    for name in ("flowrl", "grpo"):
        advantages = OBJECTIVES[name].advantage_fn(*args, num_samples_per_prompt=GROUP)
        torch.testing.assert_close(advantages, group_normalized_rewards(rewards, GROUP))
    dr_grpo = OBJECTIVES["dr_grpo"].advantage_fn(*args, num_samples_per_prompt=GROUP)
    torch.testing.assert_close(
        dr_grpo, (rewards.view(-1, GROUP) - rewards.view(-1, GROUP).mean(1, True)).view(-1)
    )
    reinforce_pp = OBJECTIVES["reinforce_pp"].advantage_fn(*args, num_samples_per_prompt=GROUP, kl_coef=0.01)
    torch.testing.assert_close(reinforce_pp, reinforce_pp_advantages(*args, kl_coef=0.01))


def test_advantage_functions_skip_invalid_responses(make_batch) -> None:
    batch, args = _advantage_inputs(make_batch)
    rewards = batch["rewards"].clone()
    rewards[[0, 5]] = float("nan")
    valid = ~rewards.isnan()
    for name in ("flowrl", "grpo", "dr_grpo", "reinforce_pp"):
        advantages = OBJECTIVES[name].advantage_fn(
            rewards, *args[1:], num_samples_per_prompt=GROUP, valid=valid
        )
        assert not advantages.isnan().any(), name
        assert advantages[~valid].abs().sum().item() == 0.0, name


def test_group_advantages_need_no_log_probs(make_batch) -> None:
    batch, _ = _advantage_inputs(make_batch)
    advantages = OBJECTIVES["grpo"].advantage_fn(
        batch["rewards"], batch["response_mask"], None, None, num_samples_per_prompt=GROUP
    )
    torch.testing.assert_close(advantages, group_normalized_rewards(batch["rewards"], GROUP))


def test_objective_options_are_keyword_only_arguments_with_defaults() -> None:
    # a config can check its options against these signatures (no **kwargs to swallow typos)
    expected_options = {
        "flowrl": {"eps", "valid"},
        "grpo": {"eps", "valid"},
        "dr_grpo": {"valid"},
        "reinforce_pp": {"kl_coef", "kl_estimator", "valid"},
    }
    for name, options in expected_options.items():
        parameters = inspect.signature(OBJECTIVES[name].advantage_fn).parameters.values()
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters), name
        keyword_only = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert keyword_only == {"num_samples_per_prompt"} | options, name
    for objective in OBJECTIVES.values():
        parameters = inspect.signature(objective.loss_fn).parameters.values()
        assert "normalizer" in {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _keyword_options(fn, reserved: set[str]) -> dict[str, object]:
    parameters = inspect.signature(fn).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in reserved
    }


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objectives_option_dataclasses_are_its_functions_options(name: str) -> None:
    """algorithm.loss / algorithm.advantage are these dataclasses: exactly the functions' keyword options,
    with the functions' defaults, each with a help text (what a saved config and --help show)."""
    objective = OBJECTIVES[name]
    advantage_reserved = {"num_samples_per_prompt", "valid"}
    if name == "ppo":  # its advantage_fn only explains that PPO needs a critic
        advantage_reserved |= set(_keyword_options(objective.advantage_fn, set()))
    for options, fn, reserved in (
        (objective.loss_options, objective.loss_fn, {"normalizer"}),
        (objective.advantage_options, objective.advantage_fn, advantage_reserved),
    ):
        defaults = options()
        assert dict(defaults) == _keyword_options(fn, reserved), (name, options)
        assert all(options.help_of(n) for n in options.names()), (name, options)
        assert {**defaults} == dict(defaults)  # a mapping: fn(**options) passes them


def test_options_refuse_unknown_keys_and_bad_values_naming_the_choices() -> None:
    loss = OBJECTIVES["flowrl"].loss_options
    assert loss.from_mapping({"beta": 3.0}, "algorithm.loss").beta == 3.0
    with pytest.raises(
        ValueError, match="unknown option algorithm.loss.bta; did you mean 'beta'.*valid: beta,"
    ):
        loss.from_mapping({"bta": 3.0}, "algorithm.loss")
    with pytest.raises(ValueError, match="unknown importance_weight 'clamped'; use one of clamp, clip"):
        loss(importance_weight="clamped")
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        OBJECTIVES["grpo"].loss_options(loss_agg_mode="sum")
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        OBJECTIVES["reinforce_pp"].advantage_options(kl_estimator="k4")
    with pytest.raises(ValueError, match=r"valid: none: it takes no options"):
        OBJECTIVES["dr_grpo"].advantage_options.from_mapping({"eps": 1e-4}, "algorithm.advantage")


def test_objectives_say_whether_they_need_groups() -> None:
    assert [n for n, o in OBJECTIVES.items() if o.needs_groups] == ["flowrl", "grpo", "dr_grpo"]


def test_ppo_advantage_fn_explains_that_it_needs_a_value_model(make_batch) -> None:
    _, args = _advantage_inputs(make_batch)
    with pytest.raises(ValueError, match="PPO needs a value model.*gae"):
        OBJECTIVES["ppo"].advantage_fn(*args, num_samples_per_prompt=GROUP)


def test_group_size_errors_reach_the_caller(make_batch) -> None:
    _, args = _advantage_inputs(make_batch)
    with pytest.raises(ValueError, match="num_samples_per_prompt=3"):
        OBJECTIVES["flowrl"].advantage_fn(*args, num_samples_per_prompt=3)


def test_count_units_follows_each_loss_default_and_override(make_batch) -> None:
    batch = make_batch(num_prompts=2, num_samples_per_prompt=GROUP)
    mask = batch["response_mask"]
    tokens, sequences = float(mask.sum()), float(mask.shape[0])
    assert OBJECTIVES["flowrl"].count_units(mask) == sequences
    assert OBJECTIVES["flowrl"].count_units(mask, sequence_weighting="length", beta=1.0) == tokens
    assert OBJECTIVES["grpo"].count_units(mask) == sequences  # seq-mean-token-mean
    assert OBJECTIVES["grpo"].count_units(mask, loss_agg_mode="token-mean") == tokens
    assert OBJECTIVES["dr_grpo"].count_units(mask) == sequences
    assert OBJECTIVES["reinforce_pp"].count_units(mask) == tokens  # token-mean
    assert OBJECTIVES["ppo"].count_units(mask, clip_eps=0.1) == tokens


# (objective, loss kwargs): every objective, several aggregation modes and FlowRL's switches.
CASES = [
    ("flowrl", {}),
    ("flowrl", {"sequence_weighting": "length"}),
    ("flowrl", {"importance_weight": "none", "reference": "old"}),
    ("flowrl", {"importance_weight": "clip", "sequence_weighting": "length"}),
    *[("grpo", {"loss_agg_mode": mode, "kl_coef": 0.1}) for mode in LOSS_AGG_MODES],
    ("dr_grpo", {}),
    *[("reinforce_pp", {"loss_agg_mode": mode}) for mode in LOSS_AGG_MODES],
    ("ppo", {}),
    ("ppo", {"loss_agg_mode": "seq-mean-token-sum"}),
]


def _loss_inputs(name: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    objective = OBJECTIVES[name]
    args = (batch["rewards"], batch["response_mask"], batch["old_logprobs"], batch["ref_logprobs"])
    if objective.needs_values:  # PPO: stand-in per-token advantages, as a critic would give
        advantages = torch.randn(
            batch["response_mask"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
    else:
        advantages = objective.advantage_fn(*args, num_samples_per_prompt=GROUP)
    inputs = {
        "logprobs": batch["logprobs"],
        "old_logprobs": batch["old_logprobs"],
        "advantages": advantages,
        "response_mask": batch["response_mask"],
    }
    if objective.uses_ref_logprobs:
        inputs["ref_logprobs"] = batch["ref_logprobs"]
    if objective.uses_log_z:
        inputs["log_z"] = batch["log_z"]
    return inputs


def _trim(inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Rows of a micro-batch, cut to its own longest response (as a trainer padding per micro-batch)."""
    length = int(inputs["response_mask"][rows].sum(1).max())
    return {name: value[rows, :length] if value.dim() == 2 else value[rows] for name, value in inputs.items()}


@pytest.mark.parametrize(("name", "loss_kwargs"), CASES)
def test_micro_batch_losses_add_up_to_the_mini_batch_loss(make_batch, name: str, loss_kwargs: dict) -> None:
    objective = OBJECTIVES[name]
    batch = make_batch(num_prompts=3, num_samples_per_prompt=GROUP, max_length=7, seed=3)
    inputs = _loss_inputs(name, batch)
    if not objective.uses_log_z:  # a constant divisor, independent of each micro-batch's padding
        loss_kwargs = {**loss_kwargs, "max_response_length": inputs["response_mask"].shape[1]}
    differentiable = [inputs["logprobs"]] + ([inputs["log_z"]] if objective.uses_log_z else [])

    full_loss, _ = objective.loss_fn(**inputs, **loss_kwargs)
    full_grads = torch.autograd.grad(full_loss, differentiable)

    micro_batches = [slice(0, 3), slice(3, 8), slice(8, 12)]  # uneven, not aligned with the groups
    normalizer = sum(
        objective.count_units(inputs["response_mask"][rows], **loss_kwargs) for rows in micro_batches
    )
    total = sum(
        objective.loss_fn(**_trim(inputs, rows), **loss_kwargs, normalizer=normalizer)[0]
        for rows in micro_batches
    )
    micro_grads = torch.autograd.grad(total, differentiable)

    torch.testing.assert_close(total, full_loss)
    for micro, full in zip(micro_grads, full_grads, strict=True):
        torch.testing.assert_close(micro, full)
    assert full_grads[0].abs().sum() > 0  # the comparison is not between two zeros


@pytest.mark.parametrize(("name", "loss_kwargs"), CASES)
def test_metrics_do_not_depend_on_the_normalizer(make_batch, name: str, loss_kwargs: dict) -> None:
    # metrics describe the micro-batch itself, so a trainer can average them weighted by batch size
    inputs = _loss_inputs(name, make_batch(num_prompts=2, num_samples_per_prompt=GROUP))
    loss, metrics = OBJECTIVES[name].loss_fn(**inputs, **loss_kwargs)
    scaled_loss, scaled_metrics = OBJECTIVES[name].loss_fn(**inputs, **loss_kwargs, normalizer=1000.0)
    assert abs(scaled_loss.item()) < abs(loss.item())
    assert set(scaled_metrics) == set(metrics)
    for key, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, key
        torch.testing.assert_close(scaled_metrics[key], value, msg=key)
