"""Counter-based random streams: the n-th number of a stream depends on its key and n alone.

Used wherever a random draw must not depend on which rows share a batch or a process: sampling in the
decode loop (one stream per sequence, keyed by its prompt's seed and sample index) and the log Z head's
dropout masks (one stream per sequence and step), so K processes draw what one process draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

# splitmix64's constants as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN_GAMMA = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's output function on int64 tensors: products wrap modulo 2**64, shifts are logical."""
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


def stream_keys(prompt_seeds: Tensor, n: int) -> Tensor:
    """(len(prompt_seeds) * n,) int64 keys: one random stream per sample, the n samples of a prompt
    contiguous, each a function of its prompt's seed and its index among the n alone."""
    samples = mix64(torch.arange(1, n + 1, dtype=torch.long, device=prompt_seeds.device) * _MIX_1)
    return mix64(prompt_seeds.long()[:, None] ^ samples[None, :]).reshape(-1)


def stream_uniforms(keys: Tensor, counters: Tensor) -> Tensor:
    """The ``counters``-th number of each stream ``keys``: (b,) float64 uniform on [0, 1) (53 random bits).

    Counter-based (splitmix64 over ``key + (counter + 1) * gamma``), so a sequence's draws depend on its
    key and its token index alone, never on which rows share its decode batch or when it joined it.
    """
    bits = mix64(keys + (counters + 1) * _GOLDEN_GAMMA)
    if keys.device.type == "mps":  # no float64 there: 24 random bits, exact in float32
        return _shift_right(bits, 40).to(torch.float32) * 2.0**-24
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53
