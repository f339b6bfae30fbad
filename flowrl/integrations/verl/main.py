"""``python -m flowrl.integrations.verl.main KEY=VALUE ...``: a FlowRL run on verl 0.9.

It composes verl's own ``ppo_trainer`` config (the Hydra config package ``verl.trainer.config``), applies
:data:`FLOWRL_OVERRIDES` (what makes it FlowRL) and then the command line's dotted overrides, and runs
verl's v1 pipeline (``verl.trainer.main_ppo.run_ppo`` with ``TaskRunnerV1``) exactly as
``python -m verl.trainer.main_ppo`` would. Any verl key can be overridden; FlowRL's own keys live under
``flowrl.`` (``flowrl.beta=15``, ``flowrl.importance_weight=clamp``, ``flowrl.log_z.num_layers=3``, ...;
see :data:`flowrl.integrations.verl.trainer.FLOWRL_DEFAULTS`). Unlike verl's Hydra entry point, Hydra's
own flags (``--cfg``, ``-m``) are not supported; ``--print-config`` prints the composed config and exits.

``configs/verl/*.sh`` are the paper's runs (docs/algorithm.md#4-training-settings) as launch scripts
around this module.
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

import flowrl.integrations.verl  # noqa: F401  (registers the loss, the engine and the trainer here)
from flowrl.integrations.verl.engine import FLOWRL_MODEL_TYPE
from flowrl.integrations.verl.loss import LOSS_MODE
from flowrl.integrations.verl.trainer import FLOWRL_DEFAULTS, TRAINER_MODE, check_config

PLUGIN_MODULE = "flowrl.integrations.verl"
"""Imported by every verl process (``VERL_USE_EXTERNAL_MODULES``, ``model.external_lib``)."""

FLOWRL_OVERRIDES: tuple[str, ...] = (
    # r_hat: the group-normalized reward (GRPO's estimator, divided by the group std).
    "algorithm.adv_estimator=grpo",
    "algorithm.norm_adv_by_std_in_grpo=true",
    "algorithm.use_kl_in_reward=false",
    # verl computes reference log-probs only with use_kl_loss; FlowRL adds no KL term (coefficient 0).
    "actor_rollout_ref.actor.use_kl_loss=true",
    "actor_rollout_ref.actor.kl_loss_coef=0.0",
    "actor_rollout_ref.actor.entropy_coeff=0.0",
    f"actor_rollout_ref.actor.policy_loss.loss_mode={LOSS_MODE}",
    # The plain mean over sequences of the length-normalized squared residual (docs/algorithm.md#1-objective).
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
    "actor_rollout_ref.actor.strategy=fsdp2",
    # The reference code's optimizer: AdamW, weight decay 0.1 (verl's default is 0.01).
    "actor_rollout_ref.actor.optim.weight_decay=0.1",
    f"+actor_rollout_ref.model.model_type={FLOWRL_MODEL_TYPE}",
    f"actor_rollout_ref.model.external_lib={PLUGIN_MODULE}",
    f"trainer.v1.trainer_mode={TRAINER_MODE}",
)
"""verl overrides that make a ``ppo_trainer`` config a FlowRL run (the ``flowrl`` section is added too)."""


def wandb_configured() -> bool:
    """Whether a W&B run can start here without a prompt: an API key in the environment or from
    ``wandb login`` (``~/.netrc``), or ``WANDB_MODE=offline`` (false for ``WANDB_MODE=disabled``)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return False
    if os.environ.get("WANDB_API_KEY") or mode in ("offline", "dryrun"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def default_logger_override() -> str:
    """``trainer.logger``: the console, plus W&B when it is configured.

    verl's default is ``[console, wandb]``, and W&B without credentials fails at its login instead of
    training; a later ``trainer.logger=...`` on the command line still wins.
    """
    return f"trainer.logger=[console{',wandb' if wandb_configured() else ''}]"


def _flowrl_section_overrides() -> list[str]:
    flat = {k: v for k, v in FLOWRL_DEFAULTS.items() if k != "log_z"}
    flat.update({f"log_z.{k}": v for k, v in FLOWRL_DEFAULTS["log_z"].items()})
    return [f"+flowrl.{key}={'null' if value is None else value}" for key, value in flat.items()]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """verl's ``ppo_trainer`` config with :data:`FLOWRL_OVERRIDES`, the ``flowrl`` section, the default
    ``trainer.logger`` (:func:`default_logger_override`) and ``overrides``.

    Raises:
        ValueError: the result is not a FlowRL run (:func:`~flowrl.integrations.verl.trainer.check_config`).
    """
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(
            config_name="ppo_trainer",
            overrides=[
                *FLOWRL_OVERRIDES,
                *_flowrl_section_overrides(),
                default_logger_override(),
                *overrides,
            ],
        )
    check_config(config)
    return config


def propagate_plugin(config: DictConfig) -> None:
    """Make every Ray process import :data:`PLUGIN_MODULE` when it imports verl."""
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if PLUGIN_MODULE not in modules:
        modules.append(PLUGIN_MODULE)
    os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)  # a local Ray cluster inherits it
    with open_dict(config):  # an existing cluster gets it through the runtime environment
        env_vars = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars") or {}
        OmegaConf.update(
            config,
            "ray_kwargs.ray_init.runtime_env.env_vars",
            {**env_vars, "VERL_USE_EXTERNAL_MODULES": os.environ["VERL_USE_EXTERNAL_MODULES"]},
            force_add=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    print_only = "--print-config" in args
    args = [a for a in args if a != "--print-config"]
    try:
        config = compose_config(args)
    except ValueError as exc:
        print(f"flowrl.integrations.verl: error: {exc}", file=sys.stderr)
        return 2
    if print_only:
        print(OmegaConf.to_yaml(config))
        return 0

    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    propagate_plugin(config)
    run_ppo(config, task_runner_class=TaskRunnerV1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
