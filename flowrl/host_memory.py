"""Host memory that goes back to the system when it is freed.

PyTorch's CPU tensors come from glibc's ``malloc``. Two of its defaults make a training process hold
memory it no longer uses, which on CPU is the run's peak and on a GPU machine the host's share:

* Blocks below the *mmap threshold* come from the heap, and freed heap stays with the process. The
  threshold starts at 128 KiB but rises to the size of every large block freed (up to 32 MiB), so after
  the first weights are dropped, a model's layers (a Qwen2.5-0.5B MLP matrix is 17 MB) are served from a
  heap that never shrinks, and fragmentation keeps pieces of it that later, larger blocks cannot reuse.
  :func:`return_large_blocks` keeps the threshold where it starts, so blocks of
  :data:`MMAP_THRESHOLD_BYTES` and more are mapped on their own and unmapped when freed.
* What was freed on the heap is kept until trimmed: :func:`release_freed_memory` returns it (``malloc_trim``)
  after phases that drop a lot at once (a full model replaced by its shards).

Both are no-ops where the C library is not glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any

MMAP_THRESHOLD_BYTES = 128 << 10
"""Blocks this large or larger are mapped on their own (glibc's ``M_MMAP_THRESHOLD``): glibc's own initial
threshold, kept from rising. Measured on the Qwen2.5-0.5B-shaped full fine-tuning of benchmarks/memory.py
(2 steps, CPU): peak 8.77 GiB at 128 KiB, 8.87 at 1 MiB, 8.98 at 4 MiB. The price is a fresh mapping (and
its page faults) for every such block: nothing next to a large model's steps, but 25% of the demo's wall
time with its 1.5M-parameter model, so the trainer sets it for large policies only
(:data:`flowrl.models.LARGE_MODEL_BYTES`)."""

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


@cache
def _glibc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def return_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for the rest of the process.

    Returns whether it took effect (False without glibc).
    """
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release_freed_memory() -> None:
    """Give the heap's freed memory back to the system (glibc's ``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
