"""``FlowRLTrainerSync``: verl 0.9's synchronous v1 PPO trainer, training the actor with FlowRL's loss.

Selected with ``trainer.v1.trainer_mode=flowrl_sync`` (:data:`TRAINER_MODE`). verl's step pipeline is
unchanged (sample -> reward -> old log-probs -> reference log-probs -> advantages -> actor update ->
weight sync); the trainer does these things around it:

* it checks once, before any worker starts, that the verl config describes FlowRL (:func:`check_config`:
  GRPO advantages normalized by the group std, a reference policy without a KL term, the ``flowrl``
  policy loss, the FlowRL engine ...), raising a ``ValueError`` that names the setting to change;
* it copies the ``flowrl.log_z`` section into ``actor_rollout_ref.model.override_config`` (flat
  ``flowrl_log_z_*`` keys, :class:`~flowrl.integrations.verl.head.LogZSettings`), the part of the model
  config that reaches the engine in every worker;
* after the workers are built (``on_init_end``) it installs
  :func:`~flowrl.integrations.verl.loss.flowrl_actor_loss` on every actor rank with ``set_loss_fn``;
* it logs FlowRL's metrics under the project's names (docs/metrics.md): verl prefixes every actor
  metric with ``actor/``, which would turn ``flowrl/log_z`` into ``actor/flowrl/log_z``;
  :meth:`FlowRLTrainerSync._update_actor` takes that prefix off again (:func:`unprefix_flowrl_metrics`);
* with ``flowrl.log_z.mode=group`` (no head), before the actor update it writes each sample's log Z,
  the group estimate over the samples sharing its ``uid``, into the batch
  (:meth:`FlowRLTrainerSync._put_group_log_z`), where the loss closure reads it.

The ``flowrl`` section of the config (defaults: :data:`FLOWRL_DEFAULTS`) holds the loss switches
(:class:`flowrl.objectives.FlowRLLossOptions`, the one definition the project's trainer and TRL use too)
and ``log_z`` (its mode and the head).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import transfer_queue as tq
from omegaconf import DictConfig, OmegaConf, open_dict
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.padding import response_to_nested

from flowrl.integrations.verl.engine import FLOWRL_MODEL_TYPE
from flowrl.integrations.verl.head import LogZSettings
from flowrl.integrations.verl.loss import (
    GROUP_LOG_Z,
    LOSS_MODE,
    SCALED_MODE,
    SEQUENCE_WEIGHTING,
    FlowRLLossOptions,
    flowrl_actor_loss,
    group_log_z_by_uid,
)

TRAINER_MODE = "flowrl_sync"
"""verl ``trainer.v1.trainer_mode`` of :class:`FlowRLTrainerSync`."""

SET_BY_VERL = {"sequence_weighting": "actor_rollout_ref.actor.loss_agg_mode"}
"""FlowRL options that verl's own config decides (the actor's ``loss_agg_mode`` gives the sequence weighting,
:data:`~flowrl.integrations.verl.loss.SEQUENCE_WEIGHTING`), so they are not keys of the ``flowrl`` section."""

FLOWRL_DEFAULTS: dict[str, Any] = {
    **{
        name: FlowRLLossOptions.default_of(name)
        for name in FlowRLLossOptions.names()
        if name not in SET_BY_VERL
    },
    "log_z": dataclasses.asdict(LogZSettings()),
}
"""The ``flowrl`` section of the verl config, with its defaults: flowrl.objectives.FlowRLLossOptions' (but
those verl sets, :data:`SET_BY_VERL`) and ``log_z`` (docs/algorithm.md#3-switches)."""

_VERL_ACTOR_PREFIX = "actor/"
"""What verl's trainer puts in front of every actor metric name that lacks it (``rename_dict``)."""


def unprefix_flowrl_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``actor/flowrl/<name>`` -> ``flowrl/<name>``; every other key as it is.

    verl's ``_update_actor`` prefixes the actor's metric names with ``actor/``; the ``actor/*`` names of
    the objective (``actor/ppo_kl``, ``actor/ref_kl``) already have it and keep it, and ``flowrl/*`` ones
    get their own names back, so a verl run logs what the project's trainer and the TRL adapter log.
    """
    mangled = _VERL_ACTOR_PREFIX + "flowrl/"
    return {(k[len(_VERL_ACTOR_PREFIX) :] if k.startswith(mangled) else k): v for k, v in metrics.items()}


def flowrl_section(config: DictConfig) -> tuple[FlowRLLossOptions, LogZSettings]:
    """The loss switches and head settings of a verl config's ``flowrl`` section (defaults if absent)."""
    section = OmegaConf.to_container(config.get("flowrl") or OmegaConf.create({}), resolve=True)
    for name, where in SET_BY_VERL.items():
        if name in section:
            raise ValueError(f"flowrl.{name} is not set in the flowrl section: verl's {where} decides it")
    unknown = sorted(set(section) - set(FLOWRL_DEFAULTS))
    log_z = section.pop("log_z", None) or {}
    unknown += sorted(f"log_z.{key}" for key in set(log_z) - set(FLOWRL_DEFAULTS["log_z"]))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in the flowrl section; known: {sorted(FLOWRL_DEFAULTS)} and "
            f"log_z.{{{', '.join(FLOWRL_DEFAULTS['log_z'])}}}"
        )
    loss_agg_mode = OmegaConf.select(config, "actor_rollout_ref.actor.loss_agg_mode", default=None)
    weighting = (
        {"sequence_weighting": SEQUENCE_WEIGHTING[loss_agg_mode]}
        if loss_agg_mode in SEQUENCE_WEIGHTING
        else {}
    )
    return FlowRLLossOptions(**section, **weighting), LogZSettings(**log_z)


def check_config(config: DictConfig) -> None:
    """Raise a ValueError naming the fix unless the verl config trains FlowRL as specified."""
    actor = config.actor_rollout_ref.actor
    algorithm = config.algorithm
    rollout_correction = algorithm.get("rollout_correction") or {}
    requirements = [
        (
            algorithm.adv_estimator == "grpo",
            f"algorithm.adv_estimator={algorithm.adv_estimator!r}: FlowRL's r_hat is the group-normalized "
            "reward; set algorithm.adv_estimator=grpo",
        ),
        (
            bool(algorithm.get("norm_adv_by_std_in_grpo", True)),
            "algorithm.norm_adv_by_std_in_grpo=false: FlowRL's r_hat divides by the group std (beta=15 is "
            "calibrated for it); set it to true",
        ),
        (
            not algorithm.get("use_kl_in_reward", False),
            "algorithm.use_kl_in_reward=true would change the rewards FlowRL normalizes; set it to false",
        ),
        (
            bool(actor.use_kl_loss),
            "actor_rollout_ref.actor.use_kl_loss=false: FlowRL needs reference log-probs, which verl "
            "computes only with use_kl_loss=true; set it (with kl_loss_coef=0)",
        ),
        (
            float(actor.kl_loss_coef) == 0.0,
            f"actor_rollout_ref.actor.kl_loss_coef={actor.kl_loss_coef}: FlowRL has no KL loss (pi_ref "
            "enters through the trajectory-balance residual); set it to 0",
        ),
        (
            float(actor.entropy_coeff) == 0.0,
            f"actor_rollout_ref.actor.entropy_coeff={actor.entropy_coeff}: FlowRL has no entropy bonus; "
            "set it to 0",
        ),
        (
            actor.policy_loss.loss_mode == LOSS_MODE,
            f"actor_rollout_ref.actor.policy_loss.loss_mode={actor.policy_loss.loss_mode!r}; set it to "
            f"{LOSS_MODE!r}",
        ),
        (
            actor.loss_agg_mode in SEQUENCE_WEIGHTING,
            f"actor_rollout_ref.actor.loss_agg_mode={actor.loss_agg_mode!r} has no FlowRL meaning; use "
            "seq-mean-token-mean (mean over sequences), token-mean (weighted by response length) or "
            f"{SCALED_MODE} (weighted by response length / actor.loss_scale_factor)",
        ),
        (
            actor.get("loss_scale_factor") is None or actor.loss_agg_mode == SCALED_MODE,
            f"actor_rollout_ref.actor.loss_scale_factor={actor.get('loss_scale_factor')} applies to "
            f"loss_agg_mode={SCALED_MODE} only (verl's agg_loss ignores it otherwise); set that mode or "
            "loss_scale_factor=null",
        ),
        (
            config.actor_rollout_ref.model.get("model_type") == FLOWRL_MODEL_TYPE,
            "the actor must run on FlowRL's engine (it computes log Z); set "
            f"+actor_rollout_ref.model.model_type={FLOWRL_MODEL_TYPE}",
        ),
        (
            actor.strategy == "fsdp2",
            f"actor_rollout_ref.actor.strategy={actor.strategy!r}: FlowRL's engine supports fsdp2 only",
        ),
        (
            int(actor.get("ulysses_sequence_parallel_size", 1)) == 1,
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size > 1 is not supported by the log Z head; "
            "set it to 1",
        ),
        (
            rollout_correction.get("rollout_is") is None and rollout_correction.get("rollout_rs") is None,
            "algorithm.rollout_correction.rollout_is / rollout_rs: FlowRL corrects off-policy samples with "
            "its own sequence-level weight (flowrl.importance_weight); leave both null (bypass_mode=true, "
            "which uses the rollout's log-probs as the old policy, is fine)",
        ),
        (
            not config.critic.get("enable", False),
            "critic.enable=true: FlowRL has no value model; leave it unset or false",
        ),
    ]
    problems = [message for ok, message in requirements if not ok]
    if problems:
        raise ValueError("the verl config does not describe a FlowRL run:\n  - " + "\n  - ".join(problems))
    _, log_z = flowrl_section(config)  # validates the flowrl section
    n = int(config.actor_rollout_ref.rollout.n)
    if log_z.mode == "group" and n < 2:
        raise ValueError(
            f"flowrl.log_z.mode=group estimates each prompt's log Z from its rollout.n responses, and "
            f"actor_rollout_ref.rollout.n={n}: set it >= 2 (the paper's 8), or flowrl.log_z.mode=head"
        )


def apply_log_z_settings(config: DictConfig, settings: LogZSettings) -> None:
    """Write ``settings`` into ``actor_rollout_ref.model.override_config`` (flat ``flowrl_log_z_*`` keys)."""
    with open_dict(config):
        override = config.actor_rollout_ref.model.get("override_config") or {}
        config.actor_rollout_ref.model.override_config = {**override, **settings.to_override_config()}


@register_trainer(TRAINER_MODE)
class FlowRLTrainerSync(PPOTrainerSync):
    """verl's synchronous trainer with FlowRL's loss (see the module docstring)."""

    def __init__(self, config: DictConfig) -> None:
        check_config(config)
        self.flowrl_options, self.log_z_settings = flowrl_section(config)
        apply_log_z_settings(config, self.log_z_settings)
        super().__init__(config)

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        """verl's actor update; its metrics land in ``metrics`` with FlowRL's names unprefixed. With
        ``flowrl.log_z.mode=group`` the batch first gets each sample's log Z (:meth:`_put_group_log_z`)."""
        if self.log_z_settings.mode == "group":
            batch = self._put_group_log_z(batch)
        actor_metrics: dict[str, Any] = {}
        batch = super()._update_actor(batch, actor_metrics)
        metrics.update(unprefix_flowrl_metrics(actor_metrics))
        return batch

    def _put_group_log_z(self, batch: Any) -> Any:
        """Write :data:`~flowrl.integrations.verl.loss.GROUP_LOG_Z` into the step's batch in the
        TransferQueue: each sample's group estimate over the samples sharing its ``uid``
        (:func:`~flowrl.integrations.verl.loss.group_log_z_by_uid`), on each of its response tokens as
        verl writes the advantages. The driver holds the whole step's batch, so every group is whole
        here, whatever the data-parallel split the workers get later. Returns the batch's new metadata.
        """
        fields = ["uid", "response_mask", "old_log_probs", "ref_log_prob", "advantages"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]  # nested: one row per sample, its response length
        padded = data.to_padded_tensor()
        uids = list(padded.pop("uid").tolist())
        log_z = group_log_z_by_uid(
            uids,
            padded["old_log_probs"],
            padded["ref_log_prob"],
            padded["advantages"],
            padded["response_mask"],
            options=self.flowrl_options,
            loss_agg_mode=self.config.actor_rollout_ref.actor.loss_agg_mode,
        )
        per_token = log_z.float().unsqueeze(1).expand_as(padded["advantages"]).contiguous()
        output = TensorDict(
            {GROUP_LOG_Z: response_to_nested(per_token, response_mask)}, batch_size=len(batch)
        )
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)

    def on_init_end(self) -> None:
        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        self.actor_rollout_wg.set_loss_fn(
            partial(flowrl_actor_loss, config=actor_config, options=self.flowrl_options)
        )
        super().on_init_end()
