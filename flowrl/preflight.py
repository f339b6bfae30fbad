"""Checks that run before any weights load: bad input fails in seconds, not after a 7B model loads.

:func:`check_run` reads everything a run needs that can be checked without the model: the data files
(exist, parse, verl's columns), every row's reward (its ``data_source`` maps to a reward function and
has a ground truth, or the configured ``reward.function`` imports), the model path when it is a local
one, and the output directory (:func:`check_output_dir`: a directory that already holds a run is never
overwritten by accident). Each problem is one :class:`InputError` line that names the fix; nothing is
written before the checks pass.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowrl import checkpoint as ckpt
from flowrl.config import Config
from flowrl.data.schema import read_rows
from flowrl.rewards.base import load_callable
from flowrl.rewards.registry import get_reward_fn

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "samples.jsonl",
    "training.png",
    "skipped_prompts.jsonl",
    "reward_failures.jsonl",
)
"""Files the trainer writes into a run directory (removed by ``--overwrite``)."""

RUN_DIRS = (ckpt.CHECKPOINTS_DIR, "tensorboard")
"""Directories the trainer writes into a run directory (removed by ``--overwrite``)."""


class InputError(ValueError):
    """Input that cannot work, found before the run starts; the message names the fix."""


@dataclass
class Checked:
    """What :func:`check_run` read, so the trainer does not read it twice."""

    rows: list[dict[str, Any]]
    files: list[str]  # the file of each row
    reward_fn: Any  # the configured reward function, or None: by data_source


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(path))


def check_model_path(path: str) -> None:
    """A local model path must be a model directory; hub ids are checked when the model loads."""
    local = Path(path).expanduser()
    if not _looks_local(path):
        return
    if not local.exists():
        raise InputError(f"model.path {path} does not exist; give a local model directory or a hub id")
    if not (local / "config.json").is_file():
        raise InputError(
            f"model.path {path} is not a Hugging Face model directory (no config.json); for a training "
            "run, pass one of its checkpoints' model/ folders or export it with `flowrl export`"
        )


def read_training_rows(files: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every row of the training files (validated against verl's schema) and the file of each."""
    if not files:
        raise InputError("data.train_files is empty; give one or more parquet/jsonl files in verl's schema")
    rows: list[dict[str, Any]] = []
    origin: list[str] = []
    for path in files:
        try:
            found = read_rows(path)
        except FileNotFoundError as exc:
            raise InputError(f"{exc}; check data.train_files") from None
        except (ValueError, OSError) as exc:  # schema, JSON and parquet errors name the file
            raise InputError(f"data.train_files: {exc}") from None
        if not found:
            raise InputError(f"data file {path} holds no rows; check data.train_files")
        rows += found
        origin += [str(path)] * len(found)
    return rows, origin


def check_rewards(rows: list[dict[str, Any]], origin: list[str], function: str | None) -> Any:
    """Every row can be scored: the custom reward imports, or each ``data_source`` has a reward and a
    ground truth. Returns the custom reward function (None: by data source).

    Raises:
        InputError: naming the unknown sources with their row counts and the two ways to fix it.
    """
    if function:
        try:
            return load_callable(function)
        except ValueError as exc:
            raise InputError(f"reward.function: {exc}") from None
    unknown: Counter[str] = Counter()
    first: dict[str, str] = {}
    for row, path in zip(rows, origin, strict=True):
        source = str(row.get("data_source") or "")
        try:
            get_reward_fn(source)
        except ValueError:
            unknown[source] += 1
            first.setdefault(source, path)
    if unknown:
        listed = ", ".join(f"{s!r} ({n} rows, e.g. in {first[s]})" for s, n in unknown.most_common())
        raise InputError(
            f"no reward function for data_source {listed}; set reward.function=module:function, "
            "register one with flowrl.rewards.register_reward, or rename data_source to a known math or "
            "code source (see flowrl.rewards.registry)"
        )
    return None


def describe_run(run_dir: Path) -> str | None:
    """What a directory holds of an earlier run (None: nothing; safe to start a new run in it)."""
    if not run_dir.is_dir():
        return None
    parts = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        parts.append(f"{sum(1 for line in metrics.open() if line.strip())} steps in metrics.jsonl")
    checkpoints = ckpt.list_checkpoints(run_dir / ckpt.CHECKPOINTS_DIR)
    if checkpoints:
        parts.append(f"checkpoints up to {checkpoints[-1].name}")
    present = [n for n in (*RUN_FILES, *RUN_DIRS) if (run_dir / n).exists()]
    if not parts and present:
        parts.append(", ".join(present))
    return "; ".join(parts) or None


def check_output_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier one unless asked to continue it or replace it."""
    if resume and overwrite:
        raise InputError("--resume continues a run and --overwrite deletes it: give one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"train.output_dir {run_dir} is a file; choose a directory")
    held = describe_run(run_dir)
    if held and not resume and not overwrite:
        raise InputError(
            f"train.output_dir {run_dir} already holds a run ({held}); continue it with --resume, "
            f"replace it with --overwrite, or choose another train.output_dir"
        )
    parent = run_dir if run_dir.exists() else next(p for p in run_dir.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise InputError(f"train.output_dir {run_dir}: {parent} is not writable; choose another directory")


def clear_run(run_dir: Path) -> list[str]:
    """Remove an earlier run's files from ``run_dir`` (``--overwrite``); other files stay."""
    removed = []
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    for name in RUN_DIRS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            removed.append(name + "/")
    return removed


def check_run(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Checked:
    """Everything about a run that can be checked without loading weights.

    Raises:
        InputError: the first problem found, as one line naming the fix.
    """
    check_output_dir(Path(cfg.train.output_dir), resume=resume, overwrite=overwrite)
    check_model_path(cfg.model.path)
    rows, origin = read_training_rows(list(cfg.data.train_files))
    reward_fn = check_rewards(rows, origin, cfg.reward.function)
    return Checked(rows, origin, reward_fn)


def check_processes(cfg: Config, *, world_size: int) -> None:
    """What the config cannot do over ``world_size`` processes (known only at launch).

    Raises:
        InputError: ``train.optimizer_in_backward`` under more than one process.
    """
    if cfg.train.optimizer_in_backward and world_size > 1:
        raise InputError(
            "train.optimizer_in_backward steps each parameter before the processes have summed its "
            f"gradient: run it in one process, or over {world_size} use train.strategy=fsdp2 "
            "(sharded gradients) with train.optimizer_in_backward=false"
        )


def check_memory(cfg: Config, *, world_size: int, device: Any, force: bool, report: Any = print) -> None:
    """Give ``report`` the run's memory plan on its device (:func:`flowrl.plan.plan_memory`).

    Raises:
        InputError: the plan says the run cannot fit and ``force`` is not set (the message names the
            changes that fit).
    """
    import torch

    from flowrl.plan import plan_memory

    total = None  # on CPU the plan reads the machine's memory
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        plan = plan_memory(cfg, gpus=world_size, gpu_memory_gb=total, device=device.type, suggest=True)
    except (OSError, ValueError, KeyError) as exc:  # a hub id not downloaded yet, an unknown layout
        report(f"note: no memory plan for {cfg.model.path}: {exc}")
        return
    report(plan.summary())
    if not plan.fits and not force:
        fixes = [f"{s.change} ({' '.join(s.overrides)})" for s in plan.suggestions if s.fits]
        raise InputError(
            f"this run needs about {plan.peak_gb_per_device:.1f} GB per device and does not fit "
            f"(changes that fit: {'; '.join(fixes) or 'none found'}); pass --force to try anyway"
        )
