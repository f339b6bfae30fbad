"""Training checkpoints: written atomically, found again on resume.

Layout of one checkpoint (``<output_dir>/checkpoints/step_000010/``)::

    model/                   save_pretrained: config, safetensors weights, tokenizer (no log Z head)
    adapter/                 instead of model/ for a LoRA run: peft's adapter files (naming the base
                             model they apply to) and the tokenizer
    log_z_head.safetensors   the head, keys prefixed with flowrl.partition.LOG_Z_PREFIX
    trainer_state.pt         optimizer, scheduler, RNG states, data position, step
    COMPLETE                 written last: JSON manifest of every file above (size and SHA-256)

Everything is written into a hidden temporary directory that is renamed into place at the end, and a
checkpoint counts only with its ``COMPLETE`` marker, so a kill during a save never leaves a checkpoint
that looks valid but is not. What can still go wrong after the save (a full disk truncating a file, an
interrupted copy, a file edited by hand) is caught by the manifest: :func:`verify_checkpoint` checks
every listed file's size and checksum, and :func:`latest_intact_checkpoint` (resume, export, eval)
skips a damaged checkpoint for the newest intact one, warning with the damaged file's name.

Under torchrun only rank 0 saves (every rank holds the same weights, optimizer state and data
position); the RNG states are rank 0's. The trainer re-seeds its random streams every step from
``(seed, step, ...)``, so a resumed run does not depend on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowrl import sharding
from flowrl.partition import LOG_Z_PREFIX
from flowrl.policy import is_peft_model

HEAD_FILE = "log_z_head.safetensors"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
CHECKPOINTS_DIR = "checkpoints"  # under a run's train.output_dir
MANIFEST_VERSION = 1
_HASH_CHUNK = 8 << 20  # bytes read at a time when checksumming


class CheckpointCorruptError(ValueError):
    """A checkpoint whose files do not match its manifest; ``problems`` names each bad file."""

    def __init__(self, checkpoint: Path, problems: list[str], *, hint: str = "") -> None:
        self.checkpoint, self.problems = checkpoint, problems
        super().__init__(f"damaged checkpoint {checkpoint}: {'; '.join(problems)}{hint}")


def save_log_z_head(head: nn.Module | None, path: str | Path) -> None:
    """Save the head's weights with the project's key prefix (an empty file for no head)."""
    from safetensors.torch import save_file

    tensors = (
        {}
        if head is None
        else {LOG_Z_PREFIX + k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    )
    save_file(tensors, str(path))


def load_log_z_head(head: nn.Module | None, path: str | Path) -> None:
    """Load weights saved by :func:`save_log_z_head` into ``head`` (strict)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if head is None:
        if tensors:
            raise ValueError(
                f"{path} holds a log Z head but this run has none (log_z.mode, log_z.num_layers or the "
                "objective differ from the run that saved it)"
            )
        return
    state = {k[len(LOG_Z_PREFIX) :]: v for k, v in tensors.items() if k.startswith(LOG_Z_PREFIX)}
    head.load_state_dict(state, strict=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    tokenizer: Any,
    head: nn.Module | None,
    trainer_state: dict[str, Any],
    keep: int = 2,
    model_state_dict: dict[str, Any] | None = None,
    head_state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and keep only the ``keep`` newest.

    ``model_state_dict`` / ``head_state_dict``: full state dicts to write instead of the modules' own
    (a sharded run gathers them first).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    # a peft model saves its adapters alone (and the base model's name)
    weights_dir = tmp / (ADAPTER_DIR if is_peft_model(model) else MODEL_DIR)
    model.save_pretrained(weights_dir, safe_serialization=True, state_dict=model_state_dict)
    tokenizer.save_pretrained(weights_dir)
    if head_state_dict is not None:
        from safetensors.torch import save_file

        tensors = {LOG_Z_PREFIX + k: v.detach().cpu().contiguous() for k, v in head_state_dict.items()}
        save_file(tensors, str(tmp / HEAD_FILE))
    else:
        save_log_z_head(head, tmp / HEAD_FILE)
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    manifest = {"version": MANIFEST_VERSION, "step": step, "files": _describe_files(tmp)}
    with open(tmp / COMPLETE_MARKER, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving a step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_files(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``checkpoint``."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    return {
        p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files
    }


def read_manifest(checkpoint: str | Path) -> dict[str, Any] | None:
    """The checkpoint's manifest, or None for a checkpoint saved before manifests (marker = the step)."""
    text = (Path(checkpoint) / COMPLETE_MARKER).read_text()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        manifest = None
    if isinstance(manifest, dict) and "files" in manifest:
        return manifest
    if text.strip().isdigit():  # the marker of older versions: no file list to check against
        return None
    raise CheckpointCorruptError(Path(checkpoint), [f"{COMPLETE_MARKER} is not a valid manifest"])


def verify_checkpoint(checkpoint: str | Path, *, checksums: bool = True) -> list[str]:
    """Problems with a checkpoint's files against its manifest (empty: intact).

    Every file the manifest lists must exist with its recorded size and, with ``checksums``, its
    SHA-256. A checkpoint without a ``COMPLETE`` marker is reported as interrupted; one saved before
    manifests is only checked for its required files.
    """
    ckpt = Path(checkpoint)
    if not (ckpt / COMPLETE_MARKER).is_file():
        return [f"no {COMPLETE_MARKER} marker (its save was interrupted)"]
    try:
        manifest = read_manifest(ckpt)
    except CheckpointCorruptError as exc:
        return exc.problems
    if manifest is None:
        required = [model_dir_of(ckpt).name, HEAD_FILE, STATE_FILE]
        return [f"{name} is missing" for name in required if not (ckpt / name).exists()]
    problems = []
    for name, want in manifest["files"].items():
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {want['size']} were saved")
        elif checksums and _sha256(path) != want["sha256"]:
            problems.append(f"{path} does not match its saved checksum")
    return problems


def latest_intact_checkpoint(root: str | Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` whose files match their manifest.

    Damaged ones are skipped with a warning on stderr naming the bad files. None when there are no
    complete checkpoints at all.

    Raises:
        CheckpointCorruptError: there are complete checkpoints but none is intact (the message names
            every damaged file).
    """
    found = list_checkpoints(root)
    damaged: list[str] = []
    for checkpoint in reversed(found):
        problems = verify_checkpoint(checkpoint)
        if not problems:
            if damaged and warn:
                print(
                    f"warning: skipping damaged checkpoint(s): {'; '.join(damaged)}; using {checkpoint}",
                    file=sys.stderr,
                    flush=True,
                )
            return checkpoint
        damaged += problems
    if damaged:
        raise CheckpointCorruptError(
            Path(root),
            damaged,
            hint="; no intact checkpoint is left (restore the files, or start again with --overwrite)",
        )
    return None


def model_dir_of(checkpoint: str | Path) -> Path:
    """A checkpoint's ``model/`` (full weights) or ``adapter/`` (LoRA) directory."""
    checkpoint = Path(checkpoint)
    adapter = checkpoint / ADAPTER_DIR
    return adapter if adapter.is_dir() else checkpoint / MODEL_DIR


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (call :func:`set_rng_state` on its ``rng`` when resuming).

    Raises:
        CheckpointCorruptError: the file cannot be read (truncated, not a torch file).
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointCorruptError(Path(checkpoint), [f"{path} cannot be read ({exc})"]) from exc


# ---------------------------------------------------------------------------------------------
# A training run's checkpoint: what the trainer saves and resumes from


def save_training(
    root: str | Path,
    step: int,
    *,
    policy: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    sharded: bool,
    write: bool,
    keep: int,
) -> Path | None:
    """Checkpoint ``step`` of a run: the policy (a :class:`~flowrl.policy.Policy`), its head, the
    optimizer's state and the trainer's ``state`` (scheduler, sampler).

    Every rank calls this: a sharded run first gathers every rank's shards to rank 0 (collective). The
    rank with ``write`` (rank 0; every rank holds the same weights and state) writes; it gets the path.
    """
    model_state = head_state = None
    if sharded:
        model_state, head_state, state["optimizer"] = sharding.gather_checkpoint(policy, optimizer)
    else:
        state["optimizer"] = optimizer.state_dict()
    if not write:
        return None
    return save_checkpoint(
        root,
        step,
        model=policy.model,
        tokenizer=tokenizer,
        head=policy.log_z_head,
        trainer_state=state,
        keep=keep,
        model_state_dict=model_state,
        head_state_dict=head_state,
    )


def resume_training(
    checkpoint: str | Path, *, optimizer: torch.optim.Optimizer, sharded: bool, **stateful: Any
) -> int:
    """Load a checkpoint's trainer state into ``optimizer`` (the same full layout under ``ddp`` and
    ``fsdp2``) and each of ``stateful`` (the scheduler, the sampler: by their key in the state), and
    restore the RNG states; returns the checkpoint's step. The weights load with the models."""
    state = load_trainer_state(checkpoint)
    if sharded:
        sharding.load_full_optimizer_state(optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    for key, obj in stateful.items():
        obj.load_state_dict(state[key])
    set_rng_state(state["rng"])
    return state["step"]


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint from what a user passes (export, eval)


def is_checkpoint_dir(path: Path) -> bool:
    """A directory laid out as one training checkpoint (complete or not)."""
    return path.is_dir() and (
        bool(_STEP_DIR.match(path.name)) or (model_dir_of(path).is_dir() and (path / HEAD_FILE).exists())
    )


def is_training_output(path: str | Path) -> bool:
    """True for a run directory, its ``checkpoints/`` folder, or one checkpoint: what
    :func:`resolve_checkpoint` accepts."""
    p = Path(path).expanduser()
    return (
        is_checkpoint_dir(p) or (p / CHECKPOINTS_DIR).is_dir() or (p.name == CHECKPOINTS_DIR and p.is_dir())
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """The intact checkpoint a path names: itself, or the newest intact one of a run directory.

    A run directory whose newest checkpoints are damaged falls back to the newest intact one, with a
    warning naming the damaged files.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointCorruptError: the named checkpoint, or every checkpoint of the run, is damaged.
        ValueError: an incomplete checkpoint, a run without a complete checkpoint, or a directory that
            is neither (the message says what to pass instead).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist; give a training run directory (its train.output_dir) or one of its "
            "checkpoints/step_N directories"
        )
    if is_checkpoint_dir(p):
        if (p / COMPLETE_MARKER).is_file() and model_dir_of(p).is_dir():
            problems = verify_checkpoint(p)
            if problems:
                intact = [c.name for c in list_checkpoints(p.parent) if c != p and not verify_checkpoint(c)]
                hint = (
                    f"; intact checkpoints beside it: {intact}, or pass the run directory to take the "
                    "newest intact one"
                    if intact
                    else "; no intact checkpoint beside it"
                )
                raise CheckpointCorruptError(p, problems, hint=hint)
            return p
        complete = [c.name for c in list_checkpoints(p.parent)]
        hint = (
            f"complete checkpoints beside it: {complete}; pass one of them or the run directory"
            if complete
            else "no complete checkpoint beside it; resume the run (flowrl train CONFIG --resume)"
        )
        raise ValueError(
            f"{p} is an incomplete checkpoint (no {COMPLETE_MARKER} marker or no {MODEL_DIR}/): its save "
            f"was interrupted, so its files cannot be trusted; {hint}"
        )
    root = p if p.name == CHECKPOINTS_DIR else p / CHECKPOINTS_DIR
    if not root.is_dir():
        if (p / "config.json").is_file():
            raise ValueError(
                f"{p} is already a Hugging Face model directory, not a training checkpoint; load it "
                "directly (from_pretrained, flowrl eval --model) instead of exporting it"
            )
        raise ValueError(
            f"{p} is neither a training run directory (with {CHECKPOINTS_DIR}/) nor a checkpoint "
            f"(step_N/ with {MODEL_DIR}/ and {COMPLETE_MARKER}); pass the run's train.output_dir"
        )
    latest = latest_intact_checkpoint(root)
    if latest is None:
        found = sorted(c.name for c in root.iterdir())
        raise ValueError(
            f"no complete checkpoint under {root} (found: {found or 'nothing'}); checkpoints are written "
            "every train.save_every steps and at the end of training: let the run reach one "
            "(flowrl train CONFIG --resume) or point at a finished run"
        )
    return latest


def checkpoint_step(checkpoint: Path) -> int | None:
    match = _STEP_DIR.match(checkpoint.name)
    return int(match.group(1)) if match else None
