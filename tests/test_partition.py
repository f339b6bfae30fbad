"""The partition head log Z (flowrl.partition): pooling, architecture, parameter names and groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowrl.partition import (
    LOG_Z_PREFIX,
    LogZHead,
    is_log_z_param,
    log_z_param_groups,
    pool_prompt_states,
    split_log_z_state_dict,
)

H = 8


def _states(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_left_and_right_padding_pool_like_the_unpadded_prompt() -> None:
    prompt = _states(1, 3)  # three real tokens
    garbage = torch.full((1, 2, H), float("nan"), dtype=torch.float64)
    left = torch.cat([garbage, prompt], dim=1)
    right = torch.cat([prompt, garbage], dim=1)
    masks = {"left": torch.tensor([[0, 0, 1, 1, 1]]), "right": torch.tensor([[1, 1, 1, 0, 0]])}
    expected = prompt.mean(dim=1)
    torch.testing.assert_close(pool_prompt_states(left, masks["left"]), expected)
    torch.testing.assert_close(pool_prompt_states(right, masks["right"]), expected)


def test_rows_of_different_lengths_pool_independently() -> None:
    states = _states(2, 4)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # left-padded batch
    pooled = pool_prompt_states(states, mask)
    torch.testing.assert_close(pooled[0], states[0, 2:].mean(0))
    torch.testing.assert_close(pooled[1], states[1].mean(0))


def test_exclude_last_token_drops_exactly_the_last_real_token() -> None:
    states = _states(2, 5)
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    pooled = pool_prompt_states(states, left, exclude_last_token=True)
    torch.testing.assert_close(pooled[0], states[0, 2:4].mean(0))  # tokens 2, 3 (4 dropped)
    torch.testing.assert_close(pooled[1], states[1, 1:4].mean(0))
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pool_prompt_states(states, right, exclude_last_token=True)
    torch.testing.assert_close(pooled[0], states[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], states[1, :4].mean(0))


def test_pooling_half_precision_returns_float32() -> None:
    states = _states(2, 3).to(torch.bfloat16)
    pooled = pool_prompt_states(states, torch.ones(2, 3))
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, states.float().mean(1), atol=1e-2, rtol=1e-2)


def test_pooling_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"attention_mask \(B, L\).*\(2, 5, 8\) and \(2, 4\)"):
        pool_prompt_states(_states(2, 5), torch.ones(2, 4))


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_head_architecture(num_layers: int) -> None:
    head = LogZHead(H, num_layers=num_layers, dropout=0.1)
    modules = list(head.modules())
    count = {
        kind: sum(isinstance(m, kind) for m in modules)
        for kind in (nn.Linear, nn.GELU, nn.LayerNorm, nn.Dropout)
    }
    # (num_layers - 1) blocks Linear(H, H) -> GELU -> LayerNorm(H) -> Dropout, then Linear(H, 1)
    assert count == {
        nn.Linear: num_layers,
        nn.GELU: num_layers - 1,
        nn.LayerNorm: num_layers - 1,
        nn.Dropout: num_layers - 1,
    }
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(H, H)] * (num_layers - 1) + [(H, 1)]
    blocks = list(head.layers)
    for i in range(num_layers - 1):
        assert [type(m) for m in blocks[4 * i : 4 * i + 4]] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Dropout]
    assert sum(p.numel() for p in head.parameters()) == (num_layers - 1) * (H * H + H + 2 * H) + H + 1


def test_head_output_is_float32_of_shape_n_and_casts_its_input() -> None:
    head = LogZHead(H).to(torch.bfloat16).eval()
    log_z = head(torch.randn(5, H, dtype=torch.float64))
    assert log_z.shape == (5,) and log_z.dtype == torch.float32
    log_z.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_head_gradient_reaches_its_input() -> None:
    # log Z is computed from the policy's (not detached) hidden states, so the policy gets a gradient too
    pooled = torch.randn(3, H, requires_grad=True)
    LogZHead(H)(pooled).sum().backward()
    assert pooled.grad is not None and pooled.grad.abs().sum() > 0


def test_zero_layers_means_no_head() -> None:
    head = LogZHead(H, num_layers=0)
    assert list(head.parameters()) == []
    log_z = head(torch.randn(4, H))
    assert log_z.tolist() == [0.0] * 4 and log_z.dtype == torch.float32


def test_head_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_layers must be >= 0"):
        LogZHead(H, num_layers=-1)
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        LogZHead(0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LogZHead(H, dropout=1.0)
    with pytest.raises(ValueError, match=r"must be \(N, H\) with H = 8"):
        LogZHead(H)(torch.zeros(2, 3))


def test_log_z_parameter_names() -> None:
    assert LOG_Z_PREFIX == "log_z_head."
    assert is_log_z_param("log_z_head.layers.0.weight")
    assert is_log_z_param("module.log_z_head.layers.0.weight")
    assert is_log_z_param("_orig_mod.module.log_z_head.layers.4.bias")
    assert not is_log_z_param("model.layers.0.mlp.weight")
    assert not is_log_z_param("my_log_z_head.weight")  # only the whole attribute name counts
    assert not is_log_z_param("log_z_head_extra.weight")


class _PolicyWithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(H, H)
        self.frozen = nn.Linear(H, H)
        self.frozen.requires_grad_(False)
        self.log_z_head = LogZHead(H, num_layers=2)


def test_split_keeps_the_prefix_on_head_keys() -> None:
    state = _PolicyWithHead().state_dict()
    model_state, head_state = split_log_z_state_dict(state)
    assert set(model_state) | set(head_state) == set(state) and not set(model_state) & set(head_state)
    assert head_state and all(key.startswith(LOG_Z_PREFIX) for key in head_state)
    assert all("log_z" not in key for key in model_state)
    head = LogZHead(H, num_layers=2)
    head.load_state_dict({key.removeprefix(LOG_Z_PREFIX): value for key, value in head_state.items()})


def test_param_groups_separate_the_head_and_share_its_lr_by_default() -> None:
    policy = _PolicyWithHead()
    groups = log_z_param_groups(policy, policy.log_z_head, lr=1e-6, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["policy", "log_z_head"]
    head_ids = {id(p) for p in policy.log_z_head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head_ids
    assert not head_ids & {id(p) for p in groups[0]["params"]}  # the head is not in the policy group twice
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in policy.backbone.parameters()
    }  # frozen left out
    assert groups[1]["lr"] == 1e-6 and groups[1]["weight_decay"] == 0.1
    torch.optim.AdamW(groups).step()  # a valid AdamW configuration


def test_param_groups_respect_a_separate_head_lr_and_weight_decay() -> None:
    policy = _PolicyWithHead()
    groups = log_z_param_groups(
        policy, policy.log_z_head, lr=1e-6, weight_decay=0.1, head_lr=1e-3, head_weight_decay=0.0
    )
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (1e-6, 0.1)
    assert (groups[1]["lr"], groups[1]["weight_decay"]) == (1e-3, 0.0)
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-6, 1e-3]


def test_a_head_without_parameters_adds_no_group() -> None:
    groups = log_z_param_groups(nn.Linear(H, H), LogZHead(H, num_layers=0), lr=1e-6, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["policy"]
