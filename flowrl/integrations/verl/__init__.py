"""FlowRL on verl 0.9 (engine API): a policy loss, an FSDP engine with the log Z head, a trainer.

``pip install "flowrl[verl]"`` (verl 0.9.x; see ``docs/verl.md`` and ``requirements/verl.txt``), then::

    python -m flowrl.integrations.verl.main data.train_files=... actor_rollout_ref.model.path=...

Importing this package registers three things in verl's public registries, which is all verl needs to
run FlowRL from its own v1 trainer pipeline:

* ``"flowrl"`` in the policy-loss registry (``actor.policy_loss.loss_mode``):
  :func:`~flowrl.integrations.verl.loss.compute_policy_loss_flowrl`, which calls
  :func:`flowrl.objectives.flowrl_loss` (no second copy of the math) with verl's global-batch reduction,
  and :func:`~flowrl.integrations.verl.loss.flowrl_actor_loss`, the engine's loss closure that hands it
  the reference log-probs and log Z;
* ``"flowrl_language_model"`` in the engine registry (``+actor_rollout_ref.model.model_type``):
  :class:`~flowrl.integrations.verl.engine.FlowRLFSDPEngine`, verl's FSDP2 causal-LM engine with the
  :class:`~flowrl.partition.LogZHead` run inside the model's forward, kept out of the rollout weight sync
  and saved as ``log_z_head.safetensors``;
* ``"flowrl_sync"`` in the trainer registry (``trainer.v1.trainer_mode``):
  :class:`~flowrl.integrations.verl.trainer.FlowRLTrainerSync`, which validates the config and installs
  the loss closure on the actor workers.

Every verl process (driver, task runner, Ray workers) must import it: the launcher sets
``VERL_USE_EXTERNAL_MODULES`` and ``actor_rollout_ref.model.external_lib`` for that, and a
``verl.plugins`` entry point in the package metadata does it for any ``import verl``. verl swallows an
entry point's import error (it logs it at DEBUG); this package logs it at ERROR instead and leaves a
``flowrl_sync`` trainer behind that raises it, so a run never ends at a bare "Unknown trainer".

This targets verl's engine API of 0.8/0.9 (``verl.workers.engine``, ``engine_workers``, the v1
trainer); the published FlowRL recipe (``verl-recipe/flowrl``) uses worker classes verl removed in 0.8
and is not used here.
"""

from __future__ import annotations

try:
    import verl
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "flowrl.integrations.verl needs verl 0.9.x: pip install 'flowrl[verl]' "
        "(or pip install -r requirements/verl.txt into a separate environment)"
    ) from exc

import logging

from packaging.version import Version

SUPPORTED_VERL = (Version("0.9"), Version("0.10"))
"""verl versions this adapter was written against: [0.9, 0.10) (the 0.8 engine API, 0.9 names)."""

_TRAINER_MODE = "flowrl_sync"  # trainer.TRAINER_MODE, named here for a failed import (trainer may not load)


def _report_failed_import(exc: BaseException) -> None:
    """Make a failed plugin import loud, and the ``flowrl_sync`` trainer name explain it.

    verl loads ``verl.plugins`` entry points inside ``import verl`` and logs a failure at DEBUG only; a
    run of ``python -m verl.trainer.main_ppo ... trainer.v1.trainer_mode=flowrl_sync`` would then stop
    at ``Unknown trainer 'flowrl_sync'`` with the cause nowhere. This logs the cause at ERROR and, when
    verl's trainer registry imports, registers ``flowrl_sync`` as a stand-in that raises it.
    """
    message = (
        f"FlowRL's verl plugin (flowrl.integrations.verl) failed to import: {type(exc).__name__}: {exc}. "
        "Its loss, engine and trainer mode flowrl_sync are not registered; fix the cause (the verl "
        "environment needs pip install 'flowrl[verl]', verl >=0.9,<0.10, see docs/verl.md)"
    )
    logging.getLogger(__name__).error(message)
    try:
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    except Exception:  # the registry itself does not import: verl reports that on its own
        return

    class FlowRLPluginImportFailed:
        """``trainer.v1.trainer_mode=flowrl_sync`` when the plugin did not import: raises why."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError(message) from exc

    TRAINER_REGISTRY.setdefault(_TRAINER_MODE, FlowRLPluginImportFailed)


try:
    if not SUPPORTED_VERL[0] <= Version(Version(verl.__version__).base_version) < SUPPORTED_VERL[1]:
        raise ImportError(
            "flowrl.integrations.verl supports verl >=0.9,<0.10 (its engine API); found verl "
            f"{verl.__version__}"
        )

    from flowrl.integrations.verl.engine import FLOWRL_MODEL_TYPE, FlowRLFSDPEngine
    from flowrl.integrations.verl.head import LogZCapture, LogZSettings, without_log_z_params
    from flowrl.integrations.verl.loss import (
        LOSS_MODE,
        FlowRLLossOptions,
        compute_policy_loss_flowrl,
        flowrl_actor_loss,
    )
    from flowrl.integrations.verl.trainer import TRAINER_MODE, FlowRLTrainerSync, check_config
except Exception as exc:
    _report_failed_import(exc)
    raise

__all__ = [
    "FLOWRL_MODEL_TYPE",
    "LOSS_MODE",
    "TRAINER_MODE",
    "FlowRLFSDPEngine",
    "FlowRLLossOptions",
    "FlowRLTrainerSync",
    "LogZCapture",
    "LogZSettings",
    "check_config",
    "compute_policy_loss_flowrl",
    "flowrl_actor_loss",
    "without_log_z_params",
]
