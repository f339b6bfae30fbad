"""Data parallelism under ``torchrun``: this process's rank and the few collectives the trainer needs.

Launch ``torchrun --nproc_per_node K -m flowrl.commands train CONFIG.yaml`` and every process runs the
same loop on its share of the step's prompts. This module only knows about processes, not about RL:

* :func:`setup` joins the process group when torchrun launched us (``RANK`` and ``WORLD_SIZE`` set):
  NCCL when the rank trains on a GPU (``cuda:LOCAL_RANK``), gloo on CPU. A plain ``python`` launch
  never touches ``torch.distributed``: it gets a :class:`DataParallel` of one process whose
  collectives return their input unchanged.
* :meth:`DataParallel.all_reduce_grads` SUMS gradients. It does not average: the trainer divides
  every rank's loss by the unit count of the global mini-batch, so the sum is exactly the gradient of
  the global mini-batch mean, whatever share of it each rank held (even none).

Gradients are all-reduced explicitly once per optimizer step, in flat buckets, rather than by
``DistributedDataParallel``: a rank's share of a mini-batch can be any size, including zero, which
DDP's backward hooks (one all-reduce per backward, the same number of backwards on every rank) do not
allow. The cost is no overlap of communication with the backward pass.

How the trainer uses it. The design goal is that K processes compute what one process computes:

* Prompts: every rank draws the same ``prompts_per_step`` prompts (same sampler, same seed, so the
  data position in checkpoints is global) and takes a contiguous slice of ``prompts_per_step / K``
  (it must divide). All samples of a prompt live on one rank, so group statistics are local.
* Random numbers: each prompt's samples draw from streams keyed by ``(seed, step, position of the
  prompt in the step)`` (the engine's counter-based per-sequence streams), so the responses depend on
  neither K nor ``rollout.batch_size``. The log Z head's dropout masks come from a stream per sequence,
  keyed by ``(seed, step, epoch)`` and the sequence's position in the step, so they too are the same in
  any K and any micro-batching. Only dropout inside the model (0 in Qwen2 / Llama configs) uses torch's
  generator, seeded by ``(seed, step, rank)``. Every stream is re-seeded each step, so a resumed run
  equals a straight one.
* Advantages: the advantage function sees the whole step (its inputs are all-gathered), so batch
  statistics such as REINFORCE++'s whitening are global; each rank keeps its rows.
* Mini-batches: one permutation of the step's valid sequences, the same on every rank (seeded by
  ``(seed, step, epoch)``), cut into ``mini_batch_size`` pieces: the mini-batches one process would
  draw. Each rank runs the members it holds (any number, possibly none), divides its loss by the
  global mini-batch's unit count, and the gradients (policy and log Z head) are summed across ranks:
  exactly the single-process mini-batch gradient. The price: a rank's share of a mini-batch varies,
  so ranks wait for the busiest one when there are several mini-batches per step.
* Metrics are reduced across ranks (sums and counts, then divided), and only rank 0 prints, logs,
  plots, shows samples and writes checkpoints; the others wait at a barrier after each save. Parameters
  stay identical on every rank (same start, broadcast from rank 0; same summed gradients), so rank
  0's checkpoint is the run's. A step where no rank has a usable reward raises on every rank.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

GRAD_BUCKET_NUMEL = 1 << 25
"""Gradient elements per all-reduce bucket (128 MiB in float32): few calls, bounded extra memory."""


def launched_by_torchrun() -> bool:
    """True when the environment carries torchrun's rank variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """True on rank 0 and in a plain launch: the process that prints, logs and saves."""
    return int(os.environ.get("RANK", "0")) == 0


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as ``(seed, "rollout", step, position)``.

    Hashing keeps streams for different tuples unrelated (``seed + step`` would make the step-2 stream
    of seed 0 the step-1 stream of seed 1).
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _pick_device(name: str, local_rank: int, world_size: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world_size > 1:
        return torch.device("cuda", local_rank)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and world_size > 1:
        raise ValueError(
            f"train.device={name} puts every one of the {world_size} processes on the same GPU; use "
            "train.device=cuda (or auto): each process then takes cuda:LOCAL_RANK"
        )
    return device


@dataclass
class DataParallel:
    """This process's place among the data-parallel processes; collectives are no-ops for one process.

    Attributes:
        rank: global rank, 0 in a plain launch.
        world_size: number of processes.
        device: where this rank trains (``cuda:LOCAL_RANK`` for a multi-GPU launch).
        owns_group: :func:`setup` created the process group, so :meth:`close` destroys it.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def split(self, total: int, name: str) -> int:
        """This rank's equal share of ``total`` items; ``name`` is the config key, for the error."""
        if total % self.world_size:
            up = -(-total // self.world_size) * self.world_size
            raise ValueError(
                f"{name}={total} must be divisible by the number of processes ({self.world_size}) so that "
                f"every process gets the same number of whole prompt groups; use e.g. {name}={up}"
            )
        return total // self.world_size

    def gather(self, x: Tensor) -> Tensor:
        """Concatenate every rank's ``x`` along dim 0, in rank order.

        Args:
            x: (n, ...) with the same n on every rank; a 2-D ``x`` may differ in width (dim 1) across
                ranks and is right-padded with zeros to the widest.

        Returns:
            (world_size * n, ...); ``x`` itself for one process.
        """
        if not self.enabled:
            return x
        dist = torch.distributed
        if x.dim() == 2:
            width = torch.tensor([x.shape[1]], device=x.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            x = torch.nn.functional.pad(x, (0, int(width) - x.shape[1]))
        wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo has no bool collectives
        parts = [torch.empty_like(wire) for _ in range(self.world_size)]
        dist.all_gather(parts, wire.contiguous())
        return torch.cat(parts).to(x.dtype)

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t)

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sums over the ranks; a key missing on a rank counts as 0 there."""
        if not self.enabled:
            return dict(values)
        out: dict[str, float] = {}
        for part in self.gather_object(dict(values)):
            for key, value in part.items():
                out[key] = out.get(key, 0.0) + float(value)
        return out

    @torch.no_grad()
    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Sum ``params``' gradients over the ranks, in place (see the module docstring: no averaging).

        A parameter without a gradient on some ranks gets zeros there; one without a gradient on every
        rank keeps ``grad = None``, as in one process (so the optimizer skips it alike).
        """
        if not self.enabled:
            return
        dist = torch.distributed
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(has_grad)
        for p, flag in zip(params, has_grad.tolist(), strict=True):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        bucket: list[Tensor] = []
        for g in grads:
            if bucket and (
                g.dtype != bucket[0].dtype or sum(b.numel() for b in bucket) + g.numel() > GRAD_BUCKET_NUMEL
            ):
                self._all_reduce_bucket(bucket)
                bucket = []
            bucket.append(g)
        if bucket:
            self._all_reduce_bucket(bucket)

    @staticmethod
    def _all_reduce_bucket(grads: list[Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    @torch.no_grad()
    def broadcast_parameters(self, params: Iterable[nn.Parameter]) -> None:
        """Give every rank rank 0's values (weights a model's loader initialised randomly included)."""
        if not self.enabled:
            return
        for p in params:
            torch.distributed.broadcast(p.data, src=0)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (``[obj]`` for one process)."""
        if not self.enabled:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, obj)
        return parts

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group if :func:`setup` joined it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def setup(device: str) -> DataParallel:
    """Join torchrun's process group (when launched by it) and pick this rank's device.

    Args:
        device: the config's ``train.device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``cuda:N``
            only for a single process).

    Returns:
        This process's :class:`DataParallel`. A plain launch gets rank 0 of 1 and no process group.
    """
    if not launched_by_torchrun():
        return DataParallel(device=_pick_device(device, 0, 1))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank, world_size)
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        torch.distributed.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DataParallel(rank=rank, world_size=world_size, device=chosen, owns_group=owns_group)
