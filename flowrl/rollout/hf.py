"""Rollout with transformers' ``generate``, on the policy model itself (no weight copy to sync)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowrl.rollout.base import RolloutBatch, SamplingParams


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to ``(B, L)`` ids and mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids.to(device), mask.to(device)


class HFRolloutEngine:
    """Batched sampling with ``model.generate``: left padding, temperature / top-p / top-k, EOS handling.

    Args:
        model: the policy's causal LM (shared with the trainer, so ``sync_weights`` is a no-op).
        pad_token_id: the tokenizer's pad id.
        eos_token_id: the id (or ids) that end a response.
        batch_size: sequences per ``generate`` call (prompts x n); bounds generation memory.
        show_progress: a progress bar over generate calls.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | list[int],
        batch_size: int = 64,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.batch_size = batch_size
        self.show_progress = show_progress

    def sync_weights(self, policy_model: nn.Module) -> None:  # noqa: D102 - shares the module
        self.model = policy_model

    def _generation_config(self, params: SamplingParams) -> Any:
        from transformers import GenerationConfig

        # A fresh config, so sampling settings saved with a model (repetition penalty, top_p ...) never
        # leak in: the trainer's log-probs assume exactly these settings.
        greedy = params.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            return_dict_in_generate=True,
            output_logits=params.return_logprobs,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; the n samples of a prompt are contiguous rows."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        device = next(self.model.parameters()).device
        expanded = [p for p in prompts for _ in range(params.n)]
        config = self._generation_config(params)
        was_training = self.model.training
        self.model.eval()
        chunks = []
        starts = range(0, len(expanded), self.batch_size)
        for start in tqdm(starts, desc="rollout", disable=not self.show_progress, leave=False):
            ids, mask = left_pad(expanded[start : start + self.batch_size], self.pad_token_id, device)
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            response = out.sequences[:, ids.shape[1] :]
            logprobs = None
            if params.return_logprobs:
                scale = params.temperature if params.temperature > 0 else 1.0
                logits = torch.stack(out.logits, dim=1).float() / scale  # (b, T, V)
                logprobs = F.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)
            chunks.append((response, logprobs))
        self.model.train(was_training)
        return self._assemble(expanded, chunks, params, device)

    def _assemble(
        self,
        expanded: list[list[int]],
        chunks: list[tuple[Tensor, Tensor | None]],
        params: SamplingParams,
        device: torch.device,
    ) -> RolloutBatch:
        prompt_ids, prompt_mask = left_pad(expanded, self.pad_token_id, device)
        length = max(r.shape[1] for r, _ in chunks)
        response_ids = torch.full((len(expanded), length), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(response_ids.shape, dtype=torch.float32, device=device)
        row = 0
        for response, lp in chunks:
            response_ids[row : row + response.shape[0], : response.shape[1]] = response
            if lp is not None:
                logprobs[row : row + response.shape[0], : response.shape[1]] = lp
            row += response.shape[0]
        is_eos = torch.isin(response_ids, torch.tensor(self.eos_token_ids, device=device))
        # Keep tokens up to and including the first EOS; everything after it is padding.
        eos_before = is_eos.long().cumsum(-1) - is_eos.long()
        response_mask = (eos_before == 0).long()
        truncated = ~is_eos.any(-1)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            truncated=truncated,
            sampling_logprobs=logprobs * response_mask if params.return_logprobs else None,
        )
