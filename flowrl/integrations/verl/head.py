"""The log Z head inside verl's FSDP model: attached to the policy, run inside its forward, kept out of
the weights handed to the rollout engine. Pure torch, no verl import, so it is testable on its own.

Shape legend (one micro-batch on one data-parallel rank):
    B  sequences ([prompt | response] each)
    L  token positions of the model's input: B x (longest sequence) when verl pads the micro-batch
       (``use_remove_padding=False``), or 1 x (all tokens packed back to back, plus any suffix padding)
       when it packs it (``use_remove_padding=True``)
    P  longest prompt of the micro-batch
    H  hidden size of the policy

The head is the submodule ``log_z_head`` of the Hugging Face causal LM, so its parameter names carry
:data:`flowrl.partition.LOG_Z_PREFIX` and FSDP shards it with the model's root unit and all-reduces its
gradients. It must run inside the root module's forward: FSDP2 reshards the root's parameters after
that forward (verl passes ``reshard_after_forward=True``), so a head called afterwards would see shards.
:class:`LogZCapture` therefore registers a forward hook on the model's base model (``model.base_model``,
whose ``last_hidden_state`` is the final layer after the final norm, the states the project's
:class:`flowrl.policy.Policy` pools), gathers each sequence's prompt positions from it, mean-pools them
with :func:`flowrl.partition.pool_prompt_states` and runs the head there. Only the last layer is read;
the model is never asked for all hidden states.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.objectives.flowrl import LOG_Z_MODE, LOG_Z_MODES
from flowrl.partition import DROPOUT, LOG_Z_PREFIX, NUM_LAYERS, LogZHead, is_log_z_param, pool_prompt_states

LOG_Z_MODULE = LOG_Z_PREFIX.rstrip(".")
"""Attribute name of the head on the policy (its state-dict keys start with LOG_Z_PREFIX)."""

OVERRIDE_KEY_PREFIX = "flowrl_log_z_"
"""Prefix of the head's settings in verl's ``actor_rollout_ref.model.override_config``: the one
free-form mapping of the model config that reaches the engine in every worker process. verl also
copies these keys onto the Hugging Face config; the FlowRL engine deletes them from it again
(:func:`flowrl.integrations.verl.engine.strip_log_z_settings`), so no saved ``config.json`` has them."""


@dataclass(frozen=True)
class LogZSettings:
    """Where log Z comes from, and the head's shape and input (the ``log_z`` section;
    docs/algorithm.md#2-partition-function)."""

    # "head": the partition head below (the paper's); "group": no head, each prompt's log Z is the group
    # estimate over the samples sharing its uid, computed by the driver before the actor update
    # (flowrl.objectives.group_log_z); the settings below are then unused
    mode: str = LOG_Z_MODE
    num_layers: int = NUM_LAYERS  # Linear layers; 0: no parameters, log Z = 0 (the authors' ablation)
    dropout: float = DROPOUT  # after each hidden block (the reference code's)
    detach_input: bool = False  # stop the trajectory-balance gradient into the backbone through log Z
    exclude_last_prompt_token: bool = False  # reproduce the reference code's pooling off-by-one
    init_path: str | None = None  # a log_z_head.safetensors to start from; None: a fresh head

    def __post_init__(self) -> None:
        if self.mode not in LOG_Z_MODES:
            raise ValueError(
                f"flowrl.log_z.mode={self.mode!r} is unknown; use one of {', '.join(LOG_Z_MODES)}"
            )
        if self.mode == "group" and self.init_path is not None:
            raise ValueError(
                "flowrl.log_z.init_path starts a partition head, and flowrl.log_z.mode=group has none: set "
                "init_path=null or mode=head"
            )
        if self.num_layers < 0:
            raise ValueError(f"flowrl.log_z.num_layers must be >= 0 (0: no head), got {self.num_layers}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"flowrl.log_z.dropout must be in [0, 1), got {self.dropout}")

    def to_override_config(self) -> dict[str, Any]:
        """The settings as flat ``override_config`` entries (see :data:`OVERRIDE_KEY_PREFIX`)."""
        return {OVERRIDE_KEY_PREFIX + name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_override_config(cls, override_config: Mapping[str, Any]) -> LogZSettings:
        """Read the settings back from verl's ``HFModelConfig.override_config`` (defaults for absent keys)."""
        found = {
            key[len(OVERRIDE_KEY_PREFIX) :]: value
            for key, value in override_config.items()
            if key.startswith(OVERRIDE_KEY_PREFIX)
        }
        unknown = sorted(set(found) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown log Z setting(s) {unknown} in override_config; known: "
                f"{sorted(OVERRIDE_KEY_PREFIX + name for name in cls.__dataclass_fields__)}"
            )
        return cls(**found)


def prompt_positions(
    sequence_lengths: Tensor, prompt_lengths: Tensor, *, packed: bool, row_width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Where each sequence's prompt tokens sit among the model's flattened token positions.

    verl's engine input holds each sequence as ``[prompt | response]`` without padding in between: packed
    back to back (``packed=True``, sequence b starts at the sum of the earlier lengths) or one sequence
    per row, right-padded to ``row_width`` (``packed=False``, sequence b starts at ``b * row_width``).

    Args:
        sequence_lengths: (B,) prompt + response tokens of each sequence.
        prompt_lengths: (B,) prompt tokens of each sequence, >= 1.
        packed: the layout, see above.
        row_width: the padded row length; required when ``packed`` is False.

    Returns:
        ``(index, mask)``, both (B, P): flat positions into the model's (L, H) states (0 where masked) and
        1 on real prompt tokens.
    """
    if prompt_lengths.shape != sequence_lengths.shape or prompt_lengths.dim() != 1:
        raise ValueError(
            f"sequence_lengths and prompt_lengths must both be (B,); got {tuple(sequence_lengths.shape)} "
            f"and {tuple(prompt_lengths.shape)}"
        )
    if bool((prompt_lengths < 1).any()) or bool((prompt_lengths > sequence_lengths).any()):
        raise ValueError(f"every prompt needs 1..sequence_length tokens; got prompt lengths {prompt_lengths}")
    if packed:
        starts = torch.cumsum(sequence_lengths, 0) - sequence_lengths
    else:
        if row_width is None:
            raise ValueError("row_width (the padded row length) is required for the padded layout")
        starts = torch.arange(sequence_lengths.shape[0], device=sequence_lengths.device) * row_width
    width = int(prompt_lengths.max())
    offsets = torch.arange(width, device=prompt_lengths.device)
    mask = offsets.unsqueeze(0) < prompt_lengths.unsqueeze(1)
    index = torch.where(mask, starts.unsqueeze(1) + offsets.unsqueeze(0), 0)
    return index.long(), mask


class LogZCapture:
    """Runs the log Z head inside the policy's forward, on positions given before each forward.

    Usage (what :class:`flowrl.integrations.verl.engine.FlowRLFSDPEngine` does per micro-batch)::

        capture = LogZCapture(model, head, settings)   # before FSDP wrapping
        capture.arm(index, mask)                       # from prompt_positions()
        model(**inputs)                                # the hook computes log Z
        log_z = capture.pop()                          # (B,) float32, differentiable

    When not armed (log-prob passes) the hook does nothing, so those passes cost nothing extra.

    Args:
        model: a transformers causal LM (anything with a ``base_model`` whose output has
            ``last_hidden_state``).
        head: the :class:`~flowrl.partition.LogZHead`; attached as ``model.log_z_head``.
        settings: ``detach_input`` and ``exclude_last_prompt_token`` are read here.
    """

    def __init__(self, model: nn.Module, head: LogZHead, settings: LogZSettings) -> None:
        base = getattr(model, "base_model", None)
        if base is None or base is model:
            raise ValueError(
                f"{type(model).__name__} has no separate base_model whose output gives last_hidden_state; "
                "the log Z head needs a transformers *ForCausalLM model"
            )
        model.add_module(LOG_Z_MODULE, head)
        self.settings = settings
        self._model = model
        self._plan: tuple[Tensor, Tensor] | None = None
        self._log_z: Tensor | None = None
        self._handle = base.register_forward_hook(self._hook)

    @property
    def head(self) -> LogZHead:
        """The head as it is attached now (FSDP may have changed its class, never its identity)."""
        return getattr(self._model, LOG_Z_MODULE)

    def arm(self, index: Tensor, mask: Tensor) -> None:
        """Compute log Z in the next forward for the prompts at ``index``/``mask`` (B, P)."""
        self._plan = (index, mask)
        self._log_z = None

    def disarm(self) -> None:
        self._plan = None
        self._log_z = None

    def pop(self) -> Tensor:
        """The (B,) log Z of the last armed forward; raises if that forward did not run the hook."""
        if self._log_z is None:
            raise RuntimeError(
                "no log Z was computed: call arm() before the forward, and check that the model's base_model "
                "ran (its forward hook computes log Z)"
            )
        log_z, self._log_z, self._plan = self._log_z, None, None
        return log_z

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._plan is None:
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        index, mask = (t.to(hidden.device) for t in self._plan)
        states = hidden.reshape(-1, hidden.shape[-1])[index]  # (B, P, H)
        if self.settings.detach_input:
            states = states.detach()
        pooled = pool_prompt_states(states, mask, exclude_last_token=self.settings.exclude_last_prompt_token)
        self._log_z = self.head(pooled)


def without_log_z_params(named: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """The items of a ``(name, tensor, ...)`` stream whose name is not the head's.

    The stream is consumed item by item and nothing is skipped unread: under FSDP producing an item may
    be a collective (``DTensor.full_tensor()``) that every rank must run, so only the yield is filtered.

    Args:
        named: tuples whose first element is a parameter name, e.g. verl's ``get_per_tensor_param()``.
    """
    for item in named:
        if not is_log_z_param(item[0]):
            yield item
