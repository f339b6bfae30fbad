"""The update's batching: the global mini-batch plan and length-grouped micro-batches."""

from __future__ import annotations

import torch

from flowrl.batching import micro_batch, micro_batches, minibatch_plan
from flowrl.rollout.base import RolloutBatch


def random_rollout(n: int = 12, width: int = 40) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    lengths = torch.randint(1, width + 1, (n,))
    response_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    prompt_mask = torch.ones(n, 5, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # some prompts are shorter (left-padded)
    rollout = RolloutBatch(
        prompt_ids=torch.randint(3, 20, (n, 5)) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(3, 20, (n, width)) * response_mask,
        response_mask=response_mask,
        truncated=lengths == width,
    )
    return rollout, prompt_mask, response_mask


def test_micro_batches_are_grouped_by_length() -> None:
    rollout, prompt_mask, response_mask = random_rollout()
    n = rollout.response_ids.shape[0]
    rows = torch.randperm(n)
    micro = list(micro_batches(rows, rollout, 4))
    assert sorted(torch.cat([mb.rows for mb in micro]).tolist()) == list(range(n))  # each row once
    widths = [mb.response_width for mb in micro]
    assert widths == sorted(widths, reverse=True)
    for mb in micro:  # each micro-batch holds exactly its rows' tokens, trimmed to its own longest
        assert torch.equal(
            mb.attention_mask[:, -mb.response_width :], response_mask[mb.rows, : mb.response_width]
        )
    computed = sum(mb.input_ids.numel() for mb in micro)
    in_given_order = sum(micro_batch(rollout, rows[i : i + 4]).input_ids.numel() for i in range(0, n, 4))
    real = int(prompt_mask.sum() + response_mask.sum())
    assert real <= computed < in_given_order  # sorting removed padding the given order would compute


def test_minibatch_plan_covers_every_row_once_and_depends_on_seed_step_and_epoch_alone() -> None:
    rows = torch.tensor([0, 2, 3, 5, 7, 8, 9, 11, 12, 15])
    plan = minibatch_plan(rows, size=4, seed=1, step=3, epoch=0)
    assert [len(m) for m in plan] == [4, 4, 2]
    assert sorted(torch.cat(plan).tolist()) == rows.tolist()
    again = minibatch_plan(rows.clone(), size=4, seed=1, step=3, epoch=0)  # another rank computes the same
    assert all(torch.equal(a, b) for a, b in zip(plan, again, strict=True))
    others = [
        minibatch_plan(rows, size=4, seed=s, step=t, epoch=e) for s, t, e in [(2, 3, 0), (1, 4, 0), (1, 3, 1)]
    ]
    assert all(not torch.equal(torch.cat(plan), torch.cat(o)) for o in others)
