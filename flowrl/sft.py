"""Supervised fine-tuning on (prompt, response) pairs: the demo's warm-up before RL.

The loss is the mean negative log-likelihood of the response tokens (the EOS token included), computed
by the same :class:`flowrl.policy.Policy` forward the RL trainer uses.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from tqdm.auto import tqdm

from flowrl.objectives.masked import masked_mean
from flowrl.policy import Policy
from flowrl.rollout.base import left_pad


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each prompt and of each response followed by EOS."""
    out = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p, r))
    return out


def batch_tensors(
    encoded: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, attention_mask, prompt_length)`` of left-padded prompts + right-padded responses."""
    prompt_ids, prompt_mask = left_pad([p for p, _ in encoded], pad_id, device)
    width = max(len(r) for _, r in encoded)
    response_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros_like(response_ids)
    for i, (_, r) in enumerate(encoded):
        response_ids[i, : len(r)] = torch.tensor(r, device=device)
        response_mask[i, : len(r)] = 1
    ids = torch.cat([prompt_ids, response_ids], 1)
    return ids, torch.cat([prompt_mask, response_mask], 1), prompt_ids.shape[1]


def sft(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on ``pairs``; returns the loss of every step."""
    device = next(model.parameters()).device
    encoded = encode_pairs(tokenizer, pairs)
    policy = Policy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    for _ in tqdm(range(steps), desc="sft warm-up", disable=not progress, leave=False):
        ids, mask, prompt_length = batch_tensors(
            rng.sample(encoded, min(batch_size, len(encoded))), tokenizer.pad_token_id, device
        )
        logprobs = policy(ids, mask, prompt_length).logprobs
        loss = -masked_mean(logprobs, mask[:, prompt_length:].float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    model.eval()
    return losses
