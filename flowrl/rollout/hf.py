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


def _logits_processors(params: SamplingParams) -> Any:
    """transformers' own temperature / top-k / top-p warpers, in its order, then the sampler; greedy: none."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if params.temperature == 0:
        return LogitsProcessorList()
    processors: list[Any] = []
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*processors, InverseCdfSampler()])


class InverseCdfSampler:
    """A logits processor that draws the next token and returns scores whose argmax is that token.

    Samples from ``softmax(scores)`` by inverse transform: one uniform number per row, located in the
    cumulative distribution. That is the distribution ``torch.multinomial`` samples (what ``generate``
    uses with ``do_sample=True``), but multinomial draws an exponential variate for every vocabulary
    entry, B x V per token, which dominates CPU decoding at realistic vocabulary sizes (about 45% of a
    decode step for a 4k vocabulary, more at 150k). ``generate`` then runs greedily on the returned
    one-hot scores (0 at the drawn token, -inf elsewhere).

    The cumulative sum is in float64: in float32 its rounding (about 3e-8 per entry near 1) would move
    up to ~V x 3e-8 of probability mass between tail tokens, 0.5% at V = 150k.
    """

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """``scores`` (B, V) processed logits -> (B, V) one-hot scores of the drawn tokens."""
        wide = torch.float32 if scores.device.type == "mps" else torch.float64  # MPS has no float64
        cdf = torch.softmax(scores.float(), dim=-1).to(wide).cumsum(-1)  # (B, V)
        total = cdf[:, -1:]  # about 1
        u = torch.rand(total.shape, device=cdf.device, dtype=cdf.dtype) * total
        # u < total strictly, so a token after the last one with probability mass is never returned.
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, u, right=True)  # (B, 1): the first position with cdf > u
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


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

        # Sampling is done by the logits processors of `_logits_processors`; `generate` itself runs
        # greedily on their output (argmax of a one-hot score).
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=[] if params.ignore_eos else self.eos_token_ids,  # []: no token ends a response
            return_dict_in_generate=True,
            output_logits=params.return_logprobs,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; the n samples of a prompt are contiguous rows."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        expanded = [p for p in prompts for _ in range(params.n)]
        config, processors = self._generation_config(params), _logits_processors(params)
        was_training = self.model.training
        self.model.eval()
        # `generate` fills every setting left unset in `config` from the model's own generation config
        # (a checkpoint's repetition_penalty, top_k, ...). An empty one in its place while sampling means
        # nothing saved with a model leaks in: the trainer's log-probs assume exactly `params`.
        saved_config, self.model.generation_config = self.model.generation_config, GenerationConfig()
        chunks = []
        starts = range(0, len(expanded), self.batch_size)
        try:
            for start in tqdm(starts, desc="rollout", disable=not self.show_progress, leave=False):
                ids, mask = left_pad(expanded[start : start + self.batch_size], self.pad_token_id, device)
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors
                )
                chunks.append(self._response(ids, out, params))
        finally:
            self.model.generation_config = saved_config
            self.model.train(was_training)
        return self._assemble(expanded, chunks, params, device)

    @staticmethod
    def _response(ids: Tensor, out: Any, params: SamplingParams) -> tuple[Tensor, Tensor | None]:
        response = out.sequences[:, ids.shape[1] :]
        logprobs = None
        if params.return_logprobs:  # `out.logits` are the model's raw logits, before any processor
            scale = params.temperature if params.temperature > 0 else 1.0
            logits = torch.stack(out.logits, dim=1).float() / scale  # (b, T, V)
            logprobs = F.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)
        return response, logprobs

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
        if params.ignore_eos:  # every row ran to max_new_tokens; all of it is response
            response_mask = torch.ones_like(response_ids)
            truncated = torch.ones(len(expanded), dtype=torch.bool, device=device)
        else:
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
