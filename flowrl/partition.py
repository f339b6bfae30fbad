"""The partition head log Z_phi(x) of FlowRL (2509.15207) and the plumbing around its parameters.

Shape legend:
    B  prompts (or sequences) in the batch
    L  tokens of the (left- or right-padded) input
    H  hidden size of the policy
    N  rows given to the head (usually B)

log Z is an MLP on the policy's own final-layer hidden states (after the final norm), mean-pooled over
the prompt tokens. Causal attention makes those states independent of the response, so log Z is a
function of the prompt only. The head is a separate module with its own optimizer parameter group
(as torchgfn's ``logz_parameters()``); the loss only ever receives the ``log_z`` tensor. Its weights
carry the :data:`LOG_Z_PREFIX` name prefix everywhere they are saved, filtered or exported, so
:func:`is_log_z_param` finds them in checkpoints and keeps them out of engine and export weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.objectives.masked import masked_mean
from flowrl.streams import mix64, stream_uniforms

LOG_Z_PREFIX = "log_z_head."
"""Parameter-name prefix of the head: the attribute name under which it is attached or saved."""

NUM_LAYERS = 3
"""Linear layers of the head (the reference code's); 0 means no head (log Z = 0, the authors' ablation)."""

DROPOUT = 0.1
"""Dropout after each hidden block (the reference code's)."""


class LogZHead(nn.Module):
    """MLP from pooled prompt states to a scalar log Z.

    ``num_layers - 1`` blocks of Linear(H, H) -> GELU -> LayerNorm(H) -> Dropout, then Linear(H, 1),
    with PyTorch's default initialization. ``num_layers = 1`` is a single Linear(H, 1);
    ``num_layers = 0`` has no parameters and returns log Z = 0 for every prompt.

    Args:
        hidden_size: H, the policy's hidden size.
        num_layers: number of Linear layers, >= 0.
        dropout: dropout probability of the hidden blocks.
    """

    def __init__(self, hidden_size: int, num_layers: int = NUM_LAYERS, dropout: float = DROPOUT) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be positive (the policy's hidden size), got {hidden_size}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0 (0 disables the head: log Z = 0), got {num_layers}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        blocks: list[nn.Module] = []
        for _ in range(num_layers - 1):
            blocks += [
                nn.Linear(hidden_size, hidden_size),
                nn.GELU(),
                nn.LayerNorm(hidden_size),
                nn.Dropout(dropout),
            ]
        if num_layers > 0:
            blocks.append(nn.Linear(hidden_size, 1))
        self.layers = nn.Sequential(*blocks)

    def forward(self, pooled: Tensor, *, dropout_keys: Tensor | None = None) -> Tensor:
        """log Z for each row.

        Args:
            pooled: (N, H) pooled prompt states, in any floating dtype (cast to the head's).
            dropout_keys: (N,) int64 keys of counter-based random streams (:mod:`flowrl.streams`), one
                per row: in training, each row's dropout masks are drawn from its own stream, so they do
                not depend on which rows share the batch or the process (K data-parallel processes draw
                what one draws). None: masks from torch's global generator (``nn.Dropout``).

        Returns:
            (N,) float32 log Z.
        """
        if pooled.dim() != 2 or pooled.shape[-1] != self.hidden_size:
            raise ValueError(
                f"pooled prompt states must be (N, H) with H = {self.hidden_size}; "
                f"got shape {tuple(pooled.shape)}"
            )
        if self.num_layers == 0:
            return torch.zeros(pooled.shape[0], dtype=torch.float32, device=pooled.device)
        head_dtype = next(self.parameters()).dtype
        x = pooled.to(head_dtype)
        if dropout_keys is None or not self.training:
            return self.layers(x).squeeze(-1).float()
        if dropout_keys.shape != (x.shape[0],):
            raise ValueError(f"dropout_keys must be (N,) = ({x.shape[0]},), got {tuple(dropout_keys.shape)}")
        columns = torch.arange(self.hidden_size, device=x.device)
        for index, layer in enumerate(self.layers):
            if isinstance(layer, nn.Dropout) and layer.p > 0:
                keys = mix64(dropout_keys.to(x.device) + index)[:, None]  # a stream per row and layer
                keep = stream_uniforms(keys, columns[None, :]) >= layer.p  # (N, H)
                x = x * keep.to(x.dtype) / (1 - layer.p)
            else:
                x = layer(x)
        return x.squeeze(-1).float()


def pool_prompt_states(
    hidden_states: Tensor, attention_mask: Tensor, *, exclude_last_token: bool = False
) -> Tensor:
    """Mean of the hidden states over each row's real prompt tokens (left or right padding).

    Args:
        hidden_states: (B, L, H) final-layer states of the prompt tokens.
        attention_mask: (B, L), 1 on real tokens, 0 on padding (on either side).
        exclude_last_token: leave each row's last real token out of the mean, reproducing an
            off-by-one of the reference code (a one-token prompt then pools to zeros).

    Returns:
        (B, H) pooled states: float32 for half-precision ``hidden_states``, their dtype otherwise.
    """
    if hidden_states.dim() != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"hidden_states must be (B, L, H) and attention_mask (B, L) with the same B and L; got "
            f"{tuple(hidden_states.shape)} and {tuple(attention_mask.shape)}"
        )
    real = attention_mask.to(torch.bool)
    if exclude_last_token:
        positions = torch.arange(real.shape[-1], device=real.device)
        last = torch.where(real, positions, -1).argmax(dim=-1, keepdim=True)
        real = real & (positions != last)
    return masked_mean(hidden_states, real.unsqueeze(-1), dim=1)


def is_log_z_param(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to the partition head.

    True for ``"log_z_head.layers.0.weight"`` and for wrapped names such as
    ``"module.log_z_head.layers.0.weight"``; false for ``"model.layers.0.weight"``.
    """
    return name.startswith(LOG_Z_PREFIX) or f".{LOG_Z_PREFIX}" in name


def split_log_z_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a state dict into the policy's entries and the head's (keys unchanged, prefix kept).

    Args:
        state_dict: name -> tensor, e.g. a training checkpoint holding policy and head.

    Returns:
        ``(model_state_dict, head_state_dict)``.
    """
    model_state: dict[str, Any] = {}
    head_state: dict[str, Any] = {}
    for name, value in state_dict.items():
        (head_state if is_log_z_param(name) else model_state)[name] = value
    return model_state, head_state


def log_z_param_groups(
    model: nn.Module,
    head: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    head_lr: float | None = None,
    head_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: the policy's, then the head's in a group named ``"log_z_head"``.

    The reference code trains the head with the policy's optimizer settings (AdamW, lr 1e-6, wd 0.1);
    a separate head learning rate is common GFlowNet practice, so it can be set, defaulting to shared.
    Only parameters with ``requires_grad`` are included; head parameters are never also in the policy
    group (even when the head is a submodule of ``model``); a head without parameters adds no group.

    Args:
        model: the policy.
        head: the :class:`LogZHead`.
        lr: the policy's learning rate.
        weight_decay: the policy's weight decay.
        head_lr: the head's learning rate; defaults to ``lr``.
        head_weight_decay: the head's weight decay; defaults to ``weight_decay``.

    Returns:
        A list of dicts with ``name``, ``params``, ``lr`` and ``weight_decay``, for ``torch.optim.AdamW``.
    """
    head_params = [p for p in head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head.parameters()}
    model_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"name": "policy", "params": model_params, "lr": lr, "weight_decay": weight_decay}]
    if head_params:
        groups.append(
            {
                "name": "log_z_head",
                "params": head_params,
                "lr": lr if head_lr is None else head_lr,
                "weight_decay": weight_decay if head_weight_decay is None else head_weight_decay,
            }
        )
    return groups
