"""A training checkpoint -> a Hugging Face model directory (:func:`export_checkpoint`).

The command is ``flowrl export CHECKPOINT_OR_RUN_DIR OUTPUT_DIR`` (:mod:`flowrl.commands.export`).
What ``OUTPUT_DIR`` holds::

    config.json, generation_config.json        the policy, exactly as training saved it
    model.safetensors (or shards + index)      policy weights only: no ``log_z_head.*`` tensor
    tokenizer.json, tokenizer_config.json, ... the tokenizer
    flowrl_export.json                         provenance: source checkpoint, step, head shape
    log_z_head/log_z_head.safetensors          the partition head (FlowRL runs only)

``AutoModelForCausalLM.from_pretrained(OUTPUT_DIR)`` (and vLLM, SGLang, TRL ...) load the policy and
never see the head: it lives in a subdirectory, because loaders read only the files named by the index
or every ``*.safetensors`` at the top level (vLLM does the latter), never subdirectories. The head keeps
its keys with :data:`flowrl.partition.LOG_Z_PREFIX`, so
``flowrl.checkpoint.load_log_z_head(LogZHead(...), OUTPUT_DIR / "log_z_head/log_z_head.safetensors")``
loads it; :func:`load_exported_head` builds the head with the right shape and does that.

The weight files are copied, not re-serialized (no model is loaded, so a 32B export needs no memory
and the exported weights are bit-identical to the checkpoint's); a weight file that holds a head tensor
anyway (a policy saved together with its head) is rewritten without it.

A LoRA run's checkpoint holds adapters (``adapter/``): they are merged into their base model (loaded
from where the adapters say, or ``--base``), so the export is the same plain model directory; with
``--adapter`` peft's adapter directory is written instead (``PeftModel.from_pretrained(base, OUT)``).

A path is resolved by :func:`flowrl.checkpoint.resolve_checkpoint`: a checkpoint directory (``step_N/``
with ``model/`` and ``COMPLETE``) is used as it is; a run directory (``train.output_dir``, with
``checkpoints/``) or its ``checkpoints/`` folder gives its newest complete checkpoint.

A checkpoint of the verl adapter (:func:`verl_actor_dir`: ``global_step_N/actor``, ``global_step_N`` or
verl's ``trainer.default_local_dir``, whose ``latest_checkpointed_iteration.txt`` names the newest step)
exports the same way: its ``actor/huggingface/`` weights when verl saved them (``checkpoint.save_contents``
with ``hf_model``), else the model merged from its FSDP shards by verl's own ``model_merger`` (needs verl
installed); the head comes from ``actor/log_z_head.safetensors``. verl LoRA checkpoints are refused (see
:func:`verl_actor_dir`'s error for the merger command that exports them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from flowrl.checkpoint import (
    ADAPTER_DIR,
    HEAD_FILE,
    checkpoint_step,
    model_dir_of,
    resolve_checkpoint,
)
from flowrl.partition import LOG_Z_PREFIX, is_log_z_param

EXPORT_INFO_FILE = "flowrl_export.json"
HEAD_SUBDIR = "log_z_head"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
# verl checkpoints (flowrl.integrations.verl): the names verl and the adapter's engine write.
_VERL_ACTOR = "actor"
_VERL_FSDP_CONFIG = "fsdp_config.json"
_VERL_LATEST = "latest_checkpointed_iteration.txt"
_VERL_STEP_DIR = "global_step_"
_VERL_HEAD_SETTINGS = "log_z_head.json"
_VERL_HEAD_CONFIG_PREFIX = "flowrl_log_z_"  # head settings an older adapter left in config.json


# ---------------------------------------------------------------------------------------------
# The head


def head_shape(tensors: dict[str, Any]) -> dict[str, int]:
    """``hidden_size`` and ``num_layers`` of a :class:`~flowrl.partition.LogZHead` from its saved tensors."""
    linear = sorted(
        (k for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2),
        key=lambda k: int(k[len(LOG_Z_PREFIX) :].split(".")[1]),
    )
    if not linear:
        raise ValueError("the head file holds no Linear weight; it was not written by flowrl")
    return {"hidden_size": int(tensors[linear[0]].shape[1]), "num_layers": len(linear)}


def _training_dropout(checkpoint: Path) -> float | None:
    """``log_z.dropout`` from the run's saved config, when the checkpoint sits in a run directory."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    value = (data.get("log_z") or {}).get("dropout")
    return float(value) if value is not None else None


def _verl_head_dropout(actor: Path) -> float | None:
    """``flowrl.log_z.dropout`` of a verl run, from the settings its engine saved beside the head."""
    settings = actor / _VERL_HEAD_SETTINGS
    return float(json.loads(settings.read_text())["dropout"]) if settings.is_file() else None


def load_exported_head(output_dir: str | Path) -> Any:
    """Build the :class:`~flowrl.partition.LogZHead` of an export and load its weights (None: no head)."""
    from flowrl.checkpoint import load_log_z_head
    from flowrl.partition import DROPOUT, LogZHead

    output_dir = Path(output_dir)
    info = json.loads((output_dir / EXPORT_INFO_FILE).read_text())
    if info["log_z_head"] is None:
        return None
    shape = info["log_z_head"]
    dropout = shape.get("dropout")
    head = LogZHead(
        shape["hidden_size"], num_layers=shape["num_layers"], dropout=DROPOUT if dropout is None else dropout
    )
    load_log_z_head(head, output_dir / shape["file"])
    return head


# ---------------------------------------------------------------------------------------------
# verl checkpoints


def verl_actor_dir(path: str | Path) -> Path | None:
    """The actor directory of the verl checkpoint ``path`` names; None if ``path`` is not a verl checkpoint.

    ``path`` may be the actor directory (it holds verl's ``fsdp_config.json``), a ``global_step_N``
    directory, or verl's ``trainer.default_local_dir`` (newest step from
    ``latest_checkpointed_iteration.txt``).

    Raises:
        ValueError: a verl checkpoint that cannot be exported (a LoRA one; a missing step).
    """
    path = Path(path).expanduser()
    latest = path / _VERL_LATEST
    if latest.is_file():
        step_dir = path / f"{_VERL_STEP_DIR}{latest.read_text().strip()}"
        if not (step_dir / _VERL_ACTOR / _VERL_FSDP_CONFIG).is_file():
            raise ValueError(f"{latest} names {step_dir.name}, which holds no verl actor checkpoint")
        path = step_dir
    if (path / _VERL_ACTOR / _VERL_FSDP_CONFIG).is_file():
        path = path / _VERL_ACTOR
    if not (path / _VERL_FSDP_CONFIG).is_file():
        return None
    if (path / "lora_train_meta.json").is_file():
        raise ValueError(
            f"{path} is a verl LoRA checkpoint, which flowrl export does not merge; run verl's merger "
            f"(python -m verl.model_merger merge --backend fsdp --local_dir {path} --target_dir OUT: the "
            f"base model and OUT/lora_adapter/) and take the head from {path / HEAD_FILE}"
        )
    return path


def _verl_step(actor: Path) -> int | None:
    name = actor.parent.name
    return int(name[len(_VERL_STEP_DIR) :]) if name.startswith(_VERL_STEP_DIR) else None


def _merge_verl_shards(actor: Path, out: Path) -> None:
    """verl's ``model_merger`` (FSDP backend) on ``actor``'s shards: the model and tokenizer in ``out``."""
    try:
        from verl.model_merger.base_model_merger import ModelMergerConfig
        from verl.model_merger.fsdp_model_merger import FSDPModelMerger
    except ImportError as exc:
        raise ValueError(
            f"{actor} holds no Hugging Face weights (huggingface/*.safetensors), and merging its FSDP shards "
            "needs verl: run flowrl export where verl is installed (e.g. .venv-verl), or save checkpoints "
            "with actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"
        ) from exc
    out.mkdir(parents=True)
    config = ModelMergerConfig(
        operation="merge",
        backend="fsdp",
        local_dir=str(actor),
        target_dir=str(out),
        hf_model_config_path=str(actor / "huggingface"),
    )
    FSDPModelMerger(config).merge_and_save()


def _drop_head_settings(config_path: Path) -> int:
    """Remove the head's ``flowrl_log_z_*`` settings from a ``config.json``; returns how many."""
    if not config_path.is_file():
        return 0
    config = json.loads(config_path.read_text())
    dropped = [k for k in config if k.startswith(_VERL_HEAD_CONFIG_PREFIX)]
    if dropped:
        config_path.write_text(
            json.dumps({k: v for k, v in config.items() if k not in dropped}, indent=2) + "\n"
        )
    return len(dropped)


# ---------------------------------------------------------------------------------------------
# Writing the export


def strip_head_tensors(weights: Path, index: dict[str, Any] | None) -> int:
    """Rewrite one safetensors file without head tensors; returns how many were removed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
    dropped = [k for k in keys if is_log_z_param(k)]
    if not dropped:
        return 0
    tensors = {k: v for k, v in load_file(str(weights)).items() if not is_log_z_param(k)}
    save_file(tensors, str(weights), metadata={"format": "pt", **metadata})
    if index is not None:
        for k in dropped:
            index["weight_map"].pop(k, None)
    return len(dropped)


def export_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    adapter: bool = False,
    base: str | None = None,
) -> dict[str, Any]:
    """Write the Hugging Face model directory of a checkpoint (see the module docstring for the layout).

    Args:
        source: a checkpoint, a run directory, or a run's ``checkpoints/`` folder; or a verl checkpoint
            (:func:`verl_actor_dir`).
        output_dir: where to write; must not exist, be empty, or (with ``overwrite``) be a previous export.
        overwrite: replace a previous export at ``output_dir``.
        adapter: for a LoRA checkpoint, write peft's adapter directory instead of the merged model.
        base: for a LoRA checkpoint, the base model to merge into (default: the one the adapters name).

    Returns:
        The provenance written to ``flowrl_export.json``.

    Raises:
        FileNotFoundError, ValueError: see :func:`resolve_checkpoint`; also an ``output_dir`` that holds
            other files.
    """
    from safetensors.torch import load_file, save_file

    verl_actor = verl_actor_dir(source)
    checkpoint = verl_actor if verl_actor is not None else resolve_checkpoint(source)
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; choose a new OUTPUT_DIR or pass --overwrite")
        if not (out / EXPORT_INFO_FILE).is_file():
            raise ValueError(
                f"{out} is not a previous flowrl export (no {EXPORT_INFO_FILE}); --overwrite only replaces "
                "an export, choose a new OUTPUT_DIR"
            )
    model_dir = checkpoint / "huggingface" if verl_actor is not None else model_dir_of(checkpoint)
    lora = model_dir.name == ADAPTER_DIR
    if not lora and not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; the checkpoint was not written by flowrl train")

    # Build the export beside the target and move it into place at the end: no half-written export.
    tmp = out.parent / f".tmp_{out.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if lora and not adapter:
        _write_merged(model_dir, tmp, base=base)
    elif verl_actor is not None and not list(model_dir.glob("*.safetensors")):
        _merge_verl_shards(verl_actor, tmp)
    else:
        shutil.copytree(model_dir, tmp)
    _drop_head_settings(tmp / "config.json")
    index_path = tmp / _SAFETENSORS_INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    removed = sum(strip_head_tensors(w, index) for w in sorted(tmp.glob("*.safetensors")))
    if index is not None and removed:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if not list(tmp.glob("*.safetensors")):
        shutil.rmtree(tmp)
        raise ValueError(
            f"{model_dir} holds no .safetensors weights; re-save the checkpoint with safetensors"
        )

    head_info = None
    head_tensors = load_file(str(checkpoint / HEAD_FILE)) if (checkpoint / HEAD_FILE).is_file() else {}
    if head_tensors:
        (tmp / HEAD_SUBDIR).mkdir()
        head_file = Path(HEAD_SUBDIR) / HEAD_FILE
        save_file(head_tensors, str(tmp / head_file), metadata={"format": "pt"})
        head_info = {
            "file": str(head_file),
            "key_prefix": LOG_Z_PREFIX,
            **head_shape(head_tensors),
            "dropout": _verl_head_dropout(checkpoint)
            if verl_actor is not None
            else _training_dropout(checkpoint),
        }
    info = {
        "source_checkpoint": str(checkpoint.resolve()),
        "step": _verl_step(checkpoint) if verl_actor is not None else checkpoint_step(checkpoint),
        "format": ("lora adapter" if adapter else "merged model") if lora else "model",
        "log_z_head": head_info,
        "head_tensors_removed_from_weights": removed,
        "note": "policy weights only; the partition head (FlowRL's log Z) is in log_z_head/ and is not "
        "part of the model loaded by from_pretrained",
    }
    (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return info


def _write_merged(adapter_dir: Path, out: Path, *, base: str | None) -> None:
    """The base model with a LoRA checkpoint's adapters merged in, saved as a plain model directory."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from flowrl.policy import ADAPTER_CONFIG, load_model

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base_path = base or config["base_model_name_or_path"]
    try:
        model = load_model(base_path, dtype="auto")
    except (OSError, FileNotFoundError) as exc:
        raise ValueError(
            f"cannot load the base model {base_path!r} that {adapter_dir} adapts ({exc}); give it with "
            "--base, or export the adapters alone with --adapter"
        ) from exc
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)
