"""How one RL step's sequences are cut for the update: the global mini-batch plan and the micro-batches.

Shape legend: N sequences of the step on this rank, P prompt tokens (left-padded), T response tokens.

* :func:`minibatch_plan`: one permutation of the step's trainable sequences, the same on every rank
  (seeded by ``(seed, step, epoch)``), cut into mini-batches of ``mini_batch_size``: one optimizer step
  each. Positions are the step's (all ranks'), so the plan is a single process's whatever the rank count.
* :func:`micro_batches`: a rank's members of a mini-batch, sorted by prompt + response tokens (longest
  first) and cut into micro-batches of ``micro_batch_size``, each trimmed to its own longest prompt and
  response (:class:`Micro`), so little padding is computed. The loss of every micro-batch is divided by
  its mini-batch's unit count, so how the rows are grouped changes no gradient.
* :func:`logprobs_no_grad`: the passes without gradient (reference, old policy) in micro-batches too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowrl.distributed import derive_seed
from flowrl.rollout import RolloutBatch


@dataclass
class Micro:
    """The tensors of one micro-batch, trimmed to its own longest prompt and response."""

    input_ids: Tensor  # (m, P' + T')
    attention_mask: Tensor  # (m, P' + T')
    prompt_length: int  # P'
    rows: Tensor  # (m,) indices into the step's sequences
    response_width: int  # T'


def micro_batch(rollout: RolloutBatch, rows: Tensor) -> Micro:
    """The sequences ``rows`` of ``rollout`` as one :class:`Micro`, without the padding no row needs."""
    prompt_mask, response_mask = rollout.prompt_mask[rows], rollout.response_mask[rows]
    first = int((prompt_mask.sum(0) > 0).nonzero()[0])  # left padding shared by every row
    width = max(1, int(response_mask.sum(-1).max()))
    ids = torch.cat([rollout.prompt_ids[rows, first:], rollout.response_ids[rows, :width]], dim=1)
    mask = torch.cat([prompt_mask[:, first:], response_mask[:, :width]], dim=1)
    return Micro(ids, mask, prompt_mask.shape[1] - first, rows, width)


def by_length(rows: Tensor, rollout: RolloutBatch) -> Tensor:
    """``rows`` ordered by prompt + response tokens, longest first (ties keep their order)."""
    lengths = rollout.prompt_mask[rows].sum(-1) + rollout.response_mask[rows].sum(-1)
    return rows[torch.argsort(lengths, descending=True, stable=True)]


def micro_batches(rows: Tensor, rollout: RolloutBatch, size: int) -> Iterator[Micro]:
    """``rows`` grouped by length and cut into micro-batches of ``size`` sequences."""
    rows = by_length(rows, rollout)
    for start in range(0, len(rows), size):
        yield micro_batch(rollout, rows[start : start + size])


def minibatch_plan(step_rows: Tensor, *, size: int, seed: int, step: int, epoch: int) -> list[Tensor]:
    """The mini-batches of one pass over ``step_rows`` (positions in the step's sequences), shuffled by
    ``(seed, step, epoch)`` alike on every rank."""
    shuffle = torch.Generator().manual_seed(derive_seed(seed, "minibatch", step, epoch))
    order = step_rows[torch.randperm(len(step_rows), generator=shuffle).to(step_rows.device)]
    return [order[start : start + size] for start in range(0, len(order), size)]


def pad_to(x: Tensor, width: int, value: float = 0) -> Tensor:
    """(n, w) -> (n, width), right-padded with ``value``."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


@torch.no_grad()
def logprobs_no_grad(
    policy: Any,
    rollout: RolloutBatch,
    *,
    size: int,
    temperature: float,
    autocast: Callable[[], Any],
    with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """(N, T) log-probs (and entropies) of every sequence of ``rollout`` under ``policy`` (a
    :class:`~flowrl.policy.Policy` or a module called like one), without gradient and in eval mode (no
    dropout: the log-probs the samples were drawn with), in length-grouped micro-batches of ``size``."""
    n, width = rollout.response_ids.shape
    device = rollout.response_ids.device
    logprobs = torch.zeros(n, width, device=device)
    entropy = torch.zeros(n, width, device=device) if with_entropy else None
    was_training = policy.training
    policy.eval()
    for mb in micro_batches(torch.arange(n, device=device), rollout, size):
        with autocast():
            out = policy(
                mb.input_ids,
                mb.attention_mask,
                mb.prompt_length,
                temperature=temperature,
                with_entropy=with_entropy,
            )
        logprobs[mb.rows] = pad_to(out.logprobs, width)
        if entropy is not None:
            entropy[mb.rows] = pad_to(out.entropy, width)
    policy.train(was_training)
    return logprobs, entropy
