"""FlowRL on TRL: ``FlowRLTrainer``, a ``GRPOTrainer`` that trains with FlowRL's loss and log Z head.

Shape legend (one micro-batch on one process):
    N  sequences (prompts x ``num_generations``)
    P  prompt tokens (left-padded)
    T  completion tokens (right-padded)
    H  hidden size of the policy

TRL's ``GRPOTrainer`` (pinned to ``trl>=1.16,<1.17``: the vLLM weight-sync hook below is private API)
does the generation (transformers or vLLM, colocated or on a server), the rewards, the group-normalized
advantages, the reference log-probs and the distribution (accelerate: DDP, DeepSpeed ZeRO, FSDP, several
nodes). This subclass changes six things, and nothing else:

* **the loss**: :meth:`FlowRLTrainer._compute_loss` calls :func:`flowrl.objectives.flowrl_loss` (2509.15207)
  on the current, old and reference log-probs, log Z and TRL's advantages; no second copy of the math;
* **the log Z head**: a :class:`flowrl.partition.LogZHead` attached to the policy as the submodule
  ``log_z_head`` (:data:`~flowrl.partition.LOG_Z_PREFIX`), so the optimizer, DDP, ZeRO-3 and FSDP see it.
  Its input is the policy's final-layer hidden states of the prompt, mean-pooled over the prompt mask
  (left padding excluded) by :func:`~flowrl.partition.pool_prompt_states`, as in
  :class:`flowrl.policy.Policy`.
  It is computed *inside* the policy's forward (the same call that yields the log-probs), so sharded
  engines have its parameters gathered when it runs. It gets its own optimizer parameter group
  (``log_z_lr``, ``log_z_weight_decay``);
* **the reference model**: FlowRL always needs reference log-probs, which TRL computes only when its KL
  coefficient ``beta`` is non-zero. The trainer switches TRL's ``beta`` on, so TRL builds and shards
  the reference model (or, for a PEFT policy, uses the adapter-disabled model) as it would for GRPO; the
  loss never reads it. There is no KL term: pi_ref enters through the trajectory-balance residual;
* **the weights sent to vLLM**: the head's parameters are filtered out of the stream (and out of the
  metadata a vLLM server receives first); vLLM's model has no such parameters;
* **the prompts**: prompts longer than ``flowrl_max_prompt_length`` tokens (the paper's 2048), counted
  as the trainer tokenizes them for generation, are removed from the training and evaluation datasets
  before training, as verl's ``filter_overlong_prompts`` does; how many is logged and kept in
  ``trainer.prompts_filtered``. With ``flowrl_old_logprobs="rollout"`` and a vLLM server the trainer
  checks that the server returns processed log-probs (``--logprobs-mode processed_logprobs``, what
  ``trl vllm-serve`` sets) and refuses to start otherwise: the check TRL makes for its own vLLM
  correction does not run, because FlowRL turns that correction off;
* **saving**: ``save_model`` and checkpoints write the policy without the head and the head beside it
  as ``log_z_head.safetensors`` with ``log_z_head.``-prefixed keys, the file name and format of
  :mod:`flowrl.checkpoint`, so a head trained here loads into the project's trainer and the other way
  round (``FlowRLConfig.log_z_init_path``).

Where this departs from the project's own trainer (``flowrl.trainer``):

* the advantages are TRL's: ``(r - mean) / (std + 1e-4)`` per group (unbiased std), where
  :func:`flowrl.objectives.group_normalized_rewards` uses ``1e-6``; for rewards in {0, 1} the
  difference is below 1e-3 of r_hat; a group with equal rewards gets 0 in both;
* the reduction is a mean over each process's micro-batch divided by the gradient-accumulation steps;
  with the fixed ``per_device_train_batch_size`` of TRL and DDP's gradient average this is the mean
  over the global batch of the optimizer step (``flowrl_sequence_weighting="length"`` divides by
  TRL's global token count instead);
* the metrics: the objective's keep the project's names (``flowrl/*``, ``actor/ppo_kl``,
  ``actor/ref_kl``) and the policy's token entropy is ``actor/entropy``, as in the project's trainer;
  what the Trainer and ``GRPOTrainer`` log themselves keeps their names (``loss`` is the project's
  ``actor/loss``, ``grad_norm`` its ``optim/grad_norm``, ``learning_rate`` its ``optim/lr``; ``reward``,
  ``completions/*``, ...). docs/metrics.md has the table.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, is_peft_model
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import FusedCausalLMOutput, disable_dropout_in_model

from flowrl.checkpoint import HEAD_FILE, load_log_z_head
from flowrl.config import DataConfig
from flowrl.objectives import flowrl_loss
from flowrl.objectives.flowrl import (
    LOG_Z_MODE,
    LOG_Z_MODES,
    FlowRLLossOptions,
    group_log_z_terms,
    weighted_mean_by_group,
)
from flowrl.objectives.masked import masked_mean
from flowrl.objectives.options import check_choice
from flowrl.partition import DROPOUT, LOG_Z_PREFIX, NUM_LAYERS, LogZHead, is_log_z_param, pool_prompt_states
from flowrl.rewards.base import RewardFn, RewardStatus
from flowrl.rewards.registry import score_batch

logger = logging.get_logger(__name__)

LOG_Z_MODULE = LOG_Z_PREFIX.rstrip(".")
"""Attribute name of the head on the policy, and name of its optimizer parameter group."""

OLD_LOGPROBS = ("trainer", "rollout")
"""Where the importance weight's old log-probs come from: ``trainer``: the policy before this update,
recomputed by the trainer (or the current log-probs, detached, when TRL skips that pass because the
update is on-policy); ``rollout``: the log-probs vLLM reported while sampling, so the weight also
corrects the vLLM/trainer mismatch (tokens vLLM could not score fall back to ``trainer``)."""

MAX_PROMPT_LENGTH = DataConfig.max_prompt_length
"""The paper's prompt cap in tokens, the project's trainer's ``data.max_prompt_length``
(docs/algorithm.md#4-training-settings; verl's ``max_prompt_length``)."""

PROCESSED_LOGPROBS = "processed_logprobs"
"""vLLM ``--logprobs-mode`` whose log-probs are those of the sampling distribution (after temperature and
logit processing), the only ones an importance weight may use."""

GROUP_LOG_Z = "flowrl_log_z"
"""Key of the per-completion log Z in the generation batch under ``log_z_mode="group"`` (shuffled and split
into micro-batches with the other per-completion tensors, like ``advantages``)."""

_REFERENCE_SWITCH = 1.0
"""Non-zero value of TRL's KL coefficient that makes ``GRPOTrainer`` build the reference model and
compute its log-probs. The value is never used: the FlowRL loss has no KL term."""


def _loss_option(name: str) -> Any:
    """The ``FlowRLConfig`` field of :class:`~flowrl.objectives.FlowRLLossOptions`' option ``name``: its
    default and help, so they are written once, next to the loss."""
    return field(
        default=FlowRLLossOptions.default_of(name), metadata={"help": FlowRLLossOptions.help_of(name) + "."}
    )


@dataclass
class FlowRLConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus FlowRL's loss and partition-head settings.

    FlowRL's own fields start with ``flowrl_`` or ``log_z_``. Of GRPO's loss fields, ``loss_type``,
    ``epsilon``, ``epsilon_high``, ``delta``, ``importance_sampling_level`` and the ``sapo_*`` and
    ``vespo_*`` values have no effect; the ones that would silently change FlowRL's objective are
    refused (see :meth:`__post_init__`). Note the two betas: TRL's ``beta`` is a KL coefficient, which
    FlowRL does not have (leave it at 0); FlowRL's reward inverse temperature is ``flowrl_beta``.
    """

    # Defaults that differ from GRPOConfig's: the paper's setup (docs/algorithm.md#4-training-settings).
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (FlowRL's paper: 0.1, with lr 1e-6 and clip 1.0)."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "TRL's token-level vLLM importance-sampling correction of the GRPO loss; FlowRL does not "
            "use it. To correct the vLLM/trainer mismatch, set flowrl_old_logprobs='rollout' instead."
        },
    )

    # FlowRL's loss switches: flowrl.objectives.FlowRLLossOptions, field by field (its defaults and help).
    flowrl_beta: float = _loss_option("beta")
    flowrl_importance_weight: str = _loss_option("importance_weight")
    flowrl_max_importance_weight: float = _loss_option("max_importance_weight")
    flowrl_clip_eps: float = _loss_option("clip_eps")
    flowrl_reference: str = _loss_option("reference")
    flowrl_sequence_weighting: str = _loss_option("sequence_weighting")
    flowrl_old_logprobs: str = field(
        default="trainer",
        metadata={
            "help": "Old log-probs of the importance weight: 'trainer' (recomputed by the trainer, or the "
            "current ones when on-policy) or 'rollout' (vLLM's sampling log-probs; needs use_vllm)."
        },
    )
    flowrl_max_prompt_length: int | None = field(
        default=MAX_PROMPT_LENGTH,
        metadata={
            "help": "Prompts longer than this many tokens (as the trainer tokenizes them, chat template "
            "applied) are removed from the datasets before training and counted (paper: 2048). None: no cap."
        },
    )
    log_z_mode: str = field(
        default=LOG_Z_MODE,
        metadata={
            "help": "Where log Z(x) comes from: 'head', a learned partition head on the prompt's hidden "
            "states (the paper's); 'group', no head: each prompt's log Z is the importance-weighted mean "
            "over its num_generations completions of beta * r_hat + ell_ref - ell, computed after "
            "generation without gradient (flowrl.objectives.group_log_z), from all of a prompt's "
            "completions across processes. The log_z_* head settings are unused in group mode."
        },
    )
    log_z_num_layers: int = field(
        default=NUM_LAYERS,
        metadata={
            "help": "Linear layers of the log Z head (paper code: 3); 0: no head, log Z = 0 (ablation)."
        },
    )
    log_z_dropout: float = field(default=DROPOUT, metadata={"help": "Dropout of the head's hidden blocks."})
    log_z_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the head's parameter group; None: learning_rate."}
    )
    log_z_weight_decay: float | None = field(
        default=None, metadata={"help": "Weight decay of the head's parameter group; None: weight_decay."}
    )
    log_z_detach_input: bool = field(
        default=False,
        metadata={"help": "Stop the trajectory-balance gradient into the backbone through log Z."},
    )
    log_z_exclude_last_prompt_token: bool = field(
        default=False, metadata={"help": "Reproduce the reference code's pooling off-by-one."}
    )
    log_z_init_path: str | None = field(
        default=None,
        metadata={
            "help": "A log_z_head.safetensors to start the head from (saved by this trainer or by the "
            "project's trainer); None: a fresh head, initialized identically on every process from `seed`."
        },
    )

    def __post_init__(self) -> None:
        check_choice("log_z_mode", self.log_z_mode, LOG_Z_MODES)
        if self.log_z_mode == "group":  # before GRPOConfig's own check, so the message names the mode
            for name in ("num_generations", "num_generations_eval"):
                value = getattr(self, name)
                if value is not None and value < 2:
                    fix = f"set {name} >= 2" + (
                        " (or None: num_generations)" if name.endswith("eval") else ""
                    )
                    raise ValueError(
                        "log_z_mode='group' estimates each prompt's log Z from its completions and needs "
                        f"at least 2 per prompt; got {name}={value}: {fix}, or use log_z_mode='head'"
                    )
            if self.log_z_init_path is not None:
                raise ValueError(
                    "log_z_init_path starts a partition head, and log_z_mode='group' has none: drop "
                    "log_z_init_path or use log_z_mode='head'"
                )
        super().__post_init__()
        self.loss_options()  # FlowRLLossOptions checks its choices and bounds
        check_choice("flowrl_old_logprobs", self.flowrl_old_logprobs, OLD_LOGPROBS)
        if self.beta != 0.0:
            raise ValueError(
                f"beta={self.beta} is TRL's KL coefficient; FlowRL has no KL term (the reference policy "
                "enters through the trajectory-balance residual) and always computes reference log-probs. "
                "Leave beta at 0; FlowRL's reward inverse temperature is flowrl_beta."
            )
        if self.log_z_num_layers < 0:
            raise ValueError(f"log_z_num_layers must be >= 0 (0: no head), got {self.log_z_num_layers}")
        if self.flowrl_max_prompt_length is not None and self.flowrl_max_prompt_length < 1:
            raise ValueError(
                f"flowrl_max_prompt_length must be >= 1 or None (no cap), got {self.flowrl_max_prompt_length}"
            )
        refused = {
            "scale_rewards": (self.scale_rewards != "group", "FlowRL's r_hat is the group-normalized reward"),
            "multi_objective_aggregation": (
                self.multi_objective_aggregation != "sum_then_normalize",
                "FlowRL normalizes the summed reward per group",
            ),
            "entropy_coef / use_adaptive_entropy": (
                self.entropy_coef != 0.0 or self.use_adaptive_entropy,
                "FlowRL has no entropy bonus",
            ),
            "top_entropy_quantile": (
                self.top_entropy_quantile != 1.0,
                "FlowRL trains on every response token",
            ),
            "off_policy_mask_threshold": (
                self.off_policy_mask_threshold is not None,
                "FlowRL weights off-policy sequences with flowrl_importance_weight",
            ),
            "vllm_importance_sampling_correction": (
                self.vllm_importance_sampling_correction,
                "use flowrl_old_logprobs='rollout' for FlowRL's sequence-level correction",
            ),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"{name} is not supported by FlowRLTrainer: {why}. Leave it at its default.")
        if self.flowrl_old_logprobs == "rollout" and not self.use_vllm:
            raise ValueError(
                "flowrl_old_logprobs='rollout' needs the sampling log-probs of vLLM: set use_vllm=True, or "
                "use flowrl_old_logprobs='trainer'"
            )
        if self.log_z_init_path is not None and not Path(self.log_z_init_path).is_file():
            raise FileNotFoundError(f"log_z_init_path {self.log_z_init_path!r} is not a file")

    def loss_options(self) -> FlowRLLossOptions:
        """The ``flowrl_*`` loss fields as :class:`~flowrl.objectives.FlowRLLossOptions`."""
        values = {name: getattr(self, f"flowrl_{name}") for name in FlowRLLossOptions.names()}
        try:
            return FlowRLLossOptions(**values)
        except ValueError as exc:  # the options' names lack the fields' prefix
            raise ValueError(f"FlowRLConfig: {exc} (the option <name> is the field flowrl_<name>)") from exc


def new_log_z_head(hidden_size: int, args: FlowRLConfig) -> LogZHead:
    """The head of ``args``, initialized from ``args.seed`` alone, so every process builds the same one.

    Engines that shard parameters (ZeRO-3) keep each process's own copy of a module's shard, so identical
    initial weights are a correctness requirement, not a convenience. The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        head = LogZHead(hidden_size, num_layers=args.log_z_num_layers, dropout=args.log_z_dropout)
    if args.log_z_init_path is not None:
        load_log_z_head(head, args.log_z_init_path)
    return head


@dataclass
class FlowRLCausalLMOutput(FusedCausalLMOutput):
    """TRL's fused-LM-head output plus ``log_z`` (N,) float32 (a declared field, so DDP, which rebuilds
    outputs from their fields, keeps it)."""

    log_z: Tensor | None = None


def attach_log_z_head(
    model: nn.Module, head: LogZHead, *, detach_input: bool = False, exclude_last_token: bool = False
) -> None:
    """Add ``head`` to ``model`` as ``model.log_z_head`` and teach its forward to return log Z.

    ``model(..., log_z_prompt_length=P)`` runs the forward ``model`` had (TRL's fused-LM-head forward),
    captures the backbone's final hidden states (after the final norm) with a forward hook, and adds
    ``log_z`` (N,) float32 to the output: the head on the states of the first P positions, mean-pooled
    over ``attention_mask[:, :P]``. Causal attention makes those states independent of the completion.
    Without ``log_z_prompt_length`` the forward is unchanged (generation, old and reference log-probs).

    Computing log Z inside the forward, rather than calling the head after it, matters under FSDP:
    the root module's parameters (the head's among them) are only unsharded during its forward.

    Args:
        model: the transformers causal LM (for PEFT, the base model under the adapters), after TRL has
            added its fused LM head.
        head: the partition head, on the model's device and in its dtype.
        detach_input: stop the gradient from log Z into the backbone.
        exclude_last_token: leave each prompt's last token out of the pooling (reference-code off-by-one).
    """
    model.add_module(LOG_Z_MODULE, head)
    inner_forward = model.forward

    # The wrapped signature is the model class's, which `generate` checks its keyword arguments against.
    @functools.wraps(type(model).forward)
    def forward(self: nn.Module, *args: Any, log_z_prompt_length: int | None = None, **kwargs: Any) -> Any:
        if log_z_prompt_length is None:
            return inner_forward(*args, **kwargs)
        if "attention_mask" not in kwargs:
            raise ValueError("log Z needs the attention_mask passed as a keyword argument")
        captured: list[Tensor] = []
        hook = self.base_model.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output.last_hidden_state)
        )
        try:
            outputs = inner_forward(*args, **kwargs)
        finally:
            hook.remove()
        prompt_states = captured[-1][:, :log_z_prompt_length]  # (N, P, H)
        if detach_input:
            prompt_states = prompt_states.detach()
        pooled = pool_prompt_states(
            prompt_states,
            kwargs["attention_mask"][:, :log_z_prompt_length],
            exclude_last_token=exclude_last_token,
        )
        return FlowRLCausalLMOutput(**dict(outputs.items()), log_z=getattr(self, LOG_Z_MODULE)(pooled))

    model.forward = types.MethodType(forward, model)


def exclude_log_z_from_vllm_sync(vllm_generation: Any) -> None:
    """Drop the head's parameters from what TRL's ``VLLMGeneration`` sends to vLLM.

    Patches ``_iter_named_params``, the one stream that both colocate and server mode read (a server
    also gets its tensor metadata from it first). The stream is filtered, not cut short: gathering a
    ZeRO-3 or FSDP parameter is a collective, so every process must still walk every parameter.
    """
    named_params = getattr(vllm_generation, "_iter_named_params", None)
    if named_params is None:
        raise RuntimeError(
            "trl's VLLMGeneration has no _iter_named_params: this TRL version is not the one flowrl's "
            "adapter was written for; install flowrl[trl] (trl>=1.16,<1.17)"
        )

    def without_log_z() -> Iterator[tuple[str, Tensor]]:
        for name, param in named_params():
            if not is_log_z_param(name):
                yield name, param

    vllm_generation._iter_named_params = without_log_z


def server_logprobs_mode(vllm_client: Any, accelerator: Any) -> str | None:
    """The ``--logprobs-mode`` of the vLLM server TRL talks to, asked once and shared with every process."""
    mode = None
    if accelerator.is_main_process:
        mode = vllm_client.get_server_info().get("model_config", {}).get("logprobs_mode")
    return broadcast_object_list([mode])[0]


def require_processed_logprobs(vllm_client: Any, accelerator: Any) -> None:
    """Refuse a vLLM server whose sampling log-probs are not the sampling distribution's.

    ``flowrl_old_logprobs="rollout"`` puts the server's log-probs into FlowRL's importance weight; a
    server started without ``--logprobs-mode processed_logprobs`` (plain ``vllm serve``) reports raw
    log-probs, before temperature and logit processing, which bias the weight at any temperature != 1.
    TRL checks this only for its own vLLM correction, which FlowRLConfig keeps off.
    """
    mode = server_logprobs_mode(vllm_client, accelerator)
    if mode != PROCESSED_LOGPROBS:
        raise ValueError(
            f"flowrl_old_logprobs='rollout' needs the vLLM server's processed log-probs, but it runs with "
            f"--logprobs-mode {mode}: restart it with `trl vllm-serve ...` (which sets it) or "
            f"`vllm serve ... --logprobs-mode {PROCESSED_LOGPROBS}`, or use flowrl_old_logprobs='trainer'"
        )


def prompt_lengths(dataset: Any, tokenize: Callable[[list], Any], *, batch_size: int = 256) -> list[int]:
    """Token count of each row's ``prompt``, with ``tokenize`` (the trainer's ``_tokenize_prompts``)."""
    lengths: list[int] = []
    for start in range(0, len(dataset), batch_size):
        prompts = dataset[start : start + batch_size]["prompt"]
        lengths += [len(ids) for ids in tokenize(prompts)[0]]
    return lengths


def drop_long_prompts(
    dataset: Any, tokenize: Callable[[list], Any], max_prompt_length: int, *, name: str = "train"
) -> tuple[Any, dict[str, int]]:
    """``dataset`` without the rows whose prompt is longer than ``max_prompt_length`` tokens, and counts.

    Returns:
        ``(kept dataset, {"total", "kept", "filtered", "max_prompt_length"})``.

    Raises:
        ValueError: a dataset that is not a ``datasets.Dataset`` (its length must be known to count), or
            one whose every prompt is too long.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"flowrl_max_prompt_length needs the {name} dataset as a datasets.Dataset to count its "
            f"prompts, got {type(dataset).__name__}; filter it yourself and set flowrl_max_prompt_length=None"
        )
    lengths = prompt_lengths(dataset, tokenize)
    kept = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    counts = {
        "total": len(lengths),
        "kept": len(kept),
        "filtered": len(lengths) - len(kept),
        "max_prompt_length": max_prompt_length,
    }
    if lengths and not kept:
        raise ValueError(
            f"every {name} prompt is longer than flowrl_max_prompt_length={max_prompt_length} tokens "
            f"(shortest: {min(lengths)}); raise the cap or set it to None"
        )
    return (dataset if counts["filtered"] == 0 else dataset.select(kept)), counts


def prompt_keys(prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """(N,) int64: a key of each row's prompt tokens (padding excluded), equal on every process for equal
    prompts (Python's hash of a tuple of ints does not depend on ``PYTHONHASHSEED``)."""
    rows = zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True)
    keys = [hash(tuple(t for t, m in zip(ids, mask, strict=True) if m)) for ids, mask in rows]
    return torch.tensor(keys, dtype=torch.int64, device=prompt_ids.device)


def gathered_group_log_z(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    keys: Tensor,
    *,
    num_generations: int,
    gather: Callable[[Tensor], Tensor],
    process_index: int,
    **loss_options: Any,
) -> Tensor:
    """This process's rows of :func:`flowrl.objectives.group_log_z` over the whole generation batch.

    TRL lays the generation batch out as consecutive runs of ``num_generations`` completions of one
    prompt, concatenated over processes in process order (each process holds the same number of rows),
    and a prompt's run may cross a process boundary (its advantages are computed after gathering the
    rewards for that reason). Each process computes its rows' per-completion target and weight
    (:func:`~flowrl.objectives.flowrl.group_log_z_terms`), their group ids (global row //
    ``num_generations``) and prompt keys; these (N,) vectors are gathered (``gather``: accelerate's, as
    TRL gathers rewards), the keys checked to agree within each group, the weighted group means taken
    (:func:`~flowrl.objectives.flowrl.weighted_mean_by_group`) and this process's slice returned. Every
    process computes the same means from the same gathered vectors.

    Args:
        logprobs, old_logprobs, ref_logprobs: (N, T) this process's per-token log-probs (the policy's
            before the update, without gradient; the importance weight's old ones; the reference's).
        advantages: (N,) r_hat. response_mask: (N, T).
        keys: (N,) int64 prompt keys (:func:`prompt_keys`).
        num_generations: completions per prompt.
        gather: concatenates a tensor over processes in process order (identity for one process).
        process_index: this process's index.
        **loss_options: :func:`flowrl.objectives.flowrl_loss`'s options (``beta``, ``importance_weight``,
            ...), so the weights are the loss's.

    Returns:
        (N,) log Z of this process's rows, without gradient history.
    """
    target, weight = group_log_z_terms(
        logprobs, old_logprobs, ref_logprobs, advantages, response_mask, **loss_options
    )
    num_local = target.shape[0]
    first = process_index * num_local
    rows = torch.arange(first, first + num_local, device=target.device)
    ids = torch.stack([rows // num_generations, keys.to(target.device)], dim=1)  # (N, 2) int64
    values = torch.stack([target, weight.to(target.dtype)], dim=1)  # (N, 2)
    all_ids, all_values = gather(ids), gather(values)
    group_ids = all_ids[:, 0]
    distinct_pairs = torch.unique(all_ids, dim=0).shape[0]  # (group id, prompt key)
    if distinct_pairs != torch.unique(group_ids).shape[0]:
        raise RuntimeError(
            f"log_z_mode='group': a run of num_generations={num_generations} rows of TRL's generation batch "
            "holds completions of different prompts, so TRL's batch layout is not the one this adapter "
            "was written for (consecutive completions of one prompt); use log_z_mode='head'"
        )
    log_z = weighted_mean_by_group(all_values[:, 0], all_values[:, 1], group_ids)
    return log_z[first : first + num_local]


def _head_file_key(name: str) -> str:
    """``module.log_z_head.layers.0.weight`` -> ``log_z_head.layers.0.weight`` (the saved-file key)."""
    return LOG_Z_PREFIX + name.split(LOG_Z_PREFIX, 1)[1]


class FlowRLTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with FlowRL's loss and log Z head (see the module docstring).

    Takes ``GRPOTrainer``'s arguments; ``args`` must be a :class:`FlowRLConfig`. Text-only models;
    no user-built optimizer (the head is added after ``GRPOTrainer.__init__``, so it would be missing).
    After construction ``trainer.log_z_head`` is the head (also ``<policy>.log_z_head``), or None with
    ``log_z_mode="group"``: then no head is built, trained, saved or filtered, and each generation batch
    gets its group estimate of log Z (:meth:`_group_log_z`).
    """

    _tag_names = ["trl", "flowrl"]
    _name = "FlowRL"

    def __init__(self, model: Any, reward_funcs: Any = None, args: FlowRLConfig | None = None, **kwargs: Any):
        if not isinstance(args, FlowRLConfig):
            raise TypeError(
                "FlowRLTrainer needs args=FlowRLConfig(...) (FlowRL's loss and head settings), "
                f"got {type(args).__name__}"
            )
        # TRL builds the reference model (or keeps the PEFT adapter switchable) and computes reference
        # log-probs only when its KL coefficient is non-zero. FlowRL needs them and has no KL term, so the
        # coefficient is switched on for TRL and left at 0 in the config; _compute_loss never reads it.
        args.beta = _REFERENCE_SWITCH
        try:
            super().__init__(model, reward_funcs, args, **kwargs)
        finally:
            args.beta = 0.0
        if self._is_vlm:
            raise ValueError("FlowRLTrainer supports text-only models; got a vision-language processor")
        if self.optimizer is not None:
            raise ValueError(
                "FlowRLTrainer builds its own optimizer so that it holds the log Z head (added after "
                "GRPOTrainer.__init__); set it through FlowRLConfig (optim, learning_rate, log_z_lr)"
            )
        self.log_z_head: LogZHead | None = None
        if args.log_z_mode == "head":
            policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
            first = next(policy.parameters())
            head = new_log_z_head(policy.config.get_text_config().hidden_size, args)
            head.to(device=first.device, dtype=first.dtype)
            if args.disable_dropout:
                disable_dropout_in_model(head)
            attach_log_z_head(
                policy,
                head,
                detach_input=args.log_z_detach_input,
                exclude_last_token=args.log_z_exclude_last_prompt_token,
            )
            self.log_z_head = head
            if self.use_vllm:
                exclude_log_z_from_vllm_sync(self.vllm_generation)
        if self.use_vllm and self.vllm_mode == "server" and args.flowrl_old_logprobs == "rollout":
            require_processed_logprobs(self.vllm_generation.vllm_client, self.accelerator)
        self.prompts_filtered: dict[str, dict[str, int]] = {}
        if args.flowrl_max_prompt_length is not None:
            self._drop_long_prompts(args.flowrl_max_prompt_length)
        self._flowrl_kwargs = dict(args.loss_options())

    def _drop_long_prompts(self, max_prompt_length: int) -> None:
        """Apply the prompt cap to the train and eval datasets; count and log what is removed."""
        datasets = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            datasets.update({f"eval_{k}": v for k, v in self.eval_dataset.items()})
        elif self.eval_dataset is not None:
            datasets["eval"] = self.eval_dataset
        kept = {}
        for name, dataset in datasets.items():
            if dataset is None:
                continue
            kept[name], self.prompts_filtered[name] = drop_long_prompts(
                dataset, self._tokenize_prompts, max_prompt_length, name=name
            )
            counts = self.prompts_filtered[name]
            if self.accelerator.is_main_process:
                logger.warning(
                    f"flowrl_max_prompt_length={max_prompt_length}: removed {counts['filtered']} of "
                    f"{counts['total']} {name} prompts longer than that; {counts['kept']} remain"
                )
        self.train_dataset = kept.get("train", self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: kept[f"eval_{k}"] for k in self.eval_dataset}
        elif self.eval_dataset is not None:
            self.eval_dataset = kept["eval"]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """TRL's optimizer, with the head's parameters moved into their own group ``"log_z_head"``.

        The group's learning rate and weight decay are ``log_z_lr`` and ``log_z_weight_decay`` (default:
        the policy's), as :func:`flowrl.partition.log_z_param_groups` gives the project's trainer. The
        policy's groups are TRL's own (no weight decay on biases and norms).
        """
        optimizer = super().create_optimizer(model)
        opt_model = self.model if model is None else model
        head_params = [p for n, p in opt_model.named_parameters() if is_log_z_param(n) and p.requires_grad]
        if not head_params or any(g.get("name") == LOG_Z_MODULE for g in optimizer.param_groups):
            return optimizer
        head_ids = {id(p) for p in head_params}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        lr, wd = self.args.log_z_lr, self.args.log_z_weight_decay
        optimizer.add_param_group(
            {
                "name": LOG_Z_MODULE,
                "params": head_params,
                "lr": self.args.learning_rate if lr is None else lr,
                "weight_decay": self.args.weight_decay if wd is None else wd,
            }
        )
        return optimizer

    def _old_logprobs(self, inputs: dict[str, Any], logprobs: Tensor) -> Tensor:
        """The importance weight's old log-probs: TRL's (or ``logprobs``, the current ones detached, when
        TRL skipped that pass because the update is on-policy), or vLLM's sampling log-probs with
        ``flowrl_old_logprobs="rollout"`` where vLLM scored the token."""
        old_logprobs = inputs.get("old_per_token_logps")
        old_logprobs = logprobs if old_logprobs is None else old_logprobs
        if self.args.flowrl_old_logprobs == "rollout":
            sampled = inputs["sampling_per_token_logps"]
            old_logprobs = torch.where(torch.isnan(sampled), old_logprobs, sampled)
        return old_logprobs

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generation batch; with ``log_z_mode="group"`` plus each completion's log Z under
        :data:`GROUP_LOG_Z`, shuffled and split into micro-batches with the rest of the batch."""
        output = super()._generate_and_score_completions(inputs)
        if self.log_z_head is None:
            output[GROUP_LOG_Z] = self._group_log_z(output)
        return output

    def _group_log_z(self, output: dict[str, Any]) -> Tensor:
        """(N,) log Z of this process's completions: each prompt's group estimate over all its
        completions, on every process (:func:`gathered_group_log_z`).

        ``ell`` is the policy's as it is now, before the updates on this batch, without gradient: TRL's
        old log-probs when it computed them, else one forward of the policy here (the price of the
        group mode when TRL's update is on-policy). The weights are the loss's at that policy, so for one
        optimizer step per generation batch the estimate is the exact minimizer of the loss being
        differentiated; with more (``steps_per_generation`` beyond the accumulation steps,
        ``num_iterations > 1``) it is held for the batch like the advantages (see
        :func:`flowrl.objectives.group_log_z` for why that is a per-prompt baseline and no gradient
        is lost by detaching it).
        """
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        response_mask = (
            completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        )
        logprobs = output.get("old_per_token_logps")
        if logprobs is None:
            batch_size = (
                self.args.per_device_train_batch_size
                if mode == "train"
                else self.args.per_device_eval_batch_size
            )
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            ):
                logprobs, _, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([prompt_ids, completion_ids], dim=1),
                    torch.cat([prompt_mask, completion_mask], dim=1),
                    completion_ids.size(1),
                    batch_size=batch_size,
                )
        return gathered_group_log_z(
            logprobs,
            self._old_logprobs(output, logprobs),
            output["ref_per_token_logps"],
            output["advantages"],
            response_mask,
            prompt_keys(prompt_ids, prompt_mask),
            num_generations=self.num_generations if mode == "train" else self.num_generations_eval,
            gather=self.accelerator.gather,
            process_index=self.accelerator.process_index,
            **self._flowrl_kwargs,
        )

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """FlowRL's loss on one micro-batch of TRL's generation batch, scaled for gradient accumulation.

        ``inputs`` is what ``_generate_and_score_completions`` returns: ``prompt_ids``/``prompt_mask``
        (N, P), ``completion_ids``/``completion_mask`` (N, T), ``advantages`` (N,), ``ref_per_token_logps``
        (N, T), when the update is off-policy ``old_per_token_logps`` (N, T), and with
        ``log_z_mode="group"`` :data:`GROUP_LOG_Z` (N,), log Z without gradient (else the head gives it).
        """
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        response_mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        num_completion_tokens = completion_ids.size(1)
        # Only completion tokens are scored, as in GRPOTrainer._get_per_token_logps_and_entropies.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-num_completion_tokens] = -100
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        head = self.log_z_head is not None  # else: log_z_mode="group", the estimate is in the batch
        with self.accelerator.autocast():
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                fused_lm_head=True,
                **({"log_z_prompt_length": prompt_ids.size(1)} if head else {}),
                **router,
            )
        logprobs = outputs.log_probs[:, -num_completion_tokens:]  # temperature-scaled, 0 off the mask
        old_logprobs = self._old_logprobs(inputs, logprobs.detach())
        log_z = outputs.log_z if head else inputs[GROUP_LOG_Z]

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self._flowrl_kwargs["sequence_weighting"] == "length":
            # TRL's token count of the whole generation batch, rescaled to one process and one optimizer step.
            tokens = max(float(inputs["num_items_in_batch"]), 1.0) / self.accelerator.num_processes
            normalizer = tokens * accumulation / self.args.steps_per_generation if mode == "train" else tokens
        else:
            normalizer = response_mask.shape[0] * accumulation
        loss, metrics = flowrl_loss(
            logprobs,
            old_logprobs,
            inputs["ref_per_token_logps"],
            log_z,
            inputs["advantages"],
            response_mask,
            normalizer=normalizer,
            **self._flowrl_kwargs,
        )
        # The objective's metrics keep their names (docs/metrics.md), as in the project's trainer; TRL logs
        # them as they are (with "eval_" in front in evaluation).
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / accumulation
            metrics["aux_loss"] = outputs.aux_loss.detach()  # TRL's name: the project has no MoE loss
        if outputs.entropy is not None:
            entropy = outputs.entropy[:, -num_completion_tokens:].detach()
            metrics["actor/entropy"] = masked_mean(entropy, response_mask)
        # One gather for all metrics: each is this micro-batch's mean, averaged over processes.
        names = sorted(metrics)
        stacked = torch.stack([metrics[n].float().reshape(()) for n in names])
        for name, value in zip(names, self.accelerator.gather(stacked[None]).mean(0).tolist(), strict=True):
            self._metrics[mode][name].append(value)
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """Save the policy without the head, and the head beside it as ``log_z_head.safetensors`` (in
        ``log_z_mode="group"`` there is no head: the policy alone, as ``GRPOTrainer`` saves it)."""
        if self.log_z_head is None:
            super()._save(output_dir, state_dict=state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict()
        gathered = bool(state_dict)  # DeepSpeed ZeRO-3 without gathering on save passes {}
        if not gathered:
            logger.warning(
                "no gathered weights to save (DeepSpeed ZeRO-3 without zero3_save_16bit_model): the log Z "
                f"head is only in DeepSpeed's checkpoint, not in {output_dir}/{HEAD_FILE}"
            )
        policy_state = {k: v for k, v in state_dict.items() if not is_log_z_param(k)}
        super()._save(output_dir, state_dict=policy_state)
        if self.args.should_save and gathered:
            head_state = {
                _head_file_key(k): v.detach().cpu().contiguous()
                for k, v in state_dict.items()
                if is_log_z_param(k)
            }
            save_file(head_state, os.path.join(output_dir, HEAD_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the policy as TRL does, then the head from the checkpoint's ``log_z_head.safetensors``.

        Not used for DeepSpeed or FSDP, whose own checkpoints hold the (sharded) head.
        """
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.log_z_head is None:  # log_z_mode="group": nothing beside the policy
            return
        head_file = Path(resume_from_checkpoint) / HEAD_FILE
        if not head_file.is_file():
            raise FileNotFoundError(
                f"checkpoint {resume_from_checkpoint} has no {HEAD_FILE}; it was not written by FlowRLTrainer"
            )
        load_log_z_head(self.log_z_head, head_file)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # The checkpoint's model.safetensors has no head keys by design; the head is loaded from its own file.
        load_result.missing_keys[:] = [k for k in load_result.missing_keys if not is_log_z_param(k)]
        super()._issue_warnings_after_load(load_result)


_TRL_REWARD_KWARGS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})
"""Keyword arguments TRL passes to reward functions that are not dataset columns."""


class FlowRLReward:
    """The project's rewards as a TRL reward function.

    TRL calls ``reward(prompts=..., completions=..., **columns)`` with the dataset's other columns as
    lists; each completion is scored by :func:`flowrl.rewards.registry.score_batch` against its row
    (verl's schema: ``data_source``, ``reward_model.ground_truth``, ...), with ``reward_fn`` for every
    row or, when it is None, the reward registered for the row's ``data_source``. A reward that could
    not be computed (error, timeout) is returned as None, which TRL leaves out of the group statistics
    and gives advantage 0; the status counts are logged as ``reward/status_<status>`` fractions.

    Args:
        reward_fn: ``fn(response, example) -> float | RewardResult`` for every row, or None.
        num_workers: processes for math checks and sandboxed programs (default: half the cores).
        name: the name TRL logs the reward under (``rewards/<name>/mean``).
    """

    def __init__(
        self, reward_fn: RewardFn | None = None, *, num_workers: int | None = None, name: str = "flowrl"
    ):
        self.reward_fn = reward_fn
        self.num_workers = num_workers
        self.__name__ = name

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[float | None]:
        responses = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        data = {k: v for k, v in columns.items() if k not in _TRL_REWARD_KWARGS}
        examples = [{"prompt": p, **{k: v[i] for k, v in data.items()}} for i, p in enumerate(prompts)]
        results = score_batch(responses, examples, reward_fn=self.reward_fn, num_workers=self.num_workers)
        log_metric: Callable[[str, float], None] | None = columns.get("log_metric")
        if log_metric is not None:
            for status in RewardStatus:
                share = sum(r.status is status for r in results) / max(len(results), 1)
                log_metric(f"reward/status_{status.value}", share)
        return [r.score if r.ok else None for r in results]


def trl_dataset(rows: Sequence[Mapping[str, Any]], tokenizer: Any) -> Any:
    """Rows in the project's schema (verl's) as a ``datasets.Dataset`` that TRL can train on.

    ``prompt`` stays a list of chat messages when the tokenizer has a chat template (TRL applies it);
    otherwise it is rendered to plain text the way the project's trainer does
    (:func:`flowrl.policy.prompt_text`), since TRL cannot template conversations without one.
    """
    from datasets import Dataset

    from flowrl.policy import prompt_text

    if not getattr(tokenizer, "chat_template", None):
        rows = [{**row, "prompt": prompt_text(tokenizer, list(row["prompt"]))} for row in rows]
    return Dataset.from_list([dict(row) for row in rows])


__all__ = [
    "GROUP_LOG_Z",
    "LOG_Z_MODULE",
    "MAX_PROMPT_LENGTH",
    "OLD_LOGPROBS",
    "PROCESSED_LOGPROBS",
    "FlowRLCausalLMOutput",
    "FlowRLConfig",
    "FlowRLReward",
    "FlowRLTrainer",
    "attach_log_z_head",
    "drop_long_prompts",
    "exclude_log_z_from_vllm_sync",
    "gathered_group_log_z",
    "new_log_z_head",
    "prompt_keys",
    "require_processed_logprobs",
    "trl_dataset",
]
