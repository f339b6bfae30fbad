"""Rollout on the policy's own transformers model (no weight copy to sync), with the project's decode loop."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowrl.rollout.base import RolloutBatch, SamplingParams, assemble, left_pad


def _warpers(params: SamplingParams) -> Any:
    """transformers' own temperature / top-k / top-p warpers, in its order (none for greedy decoding)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if params.temperature not in (0.0, 1.0):
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.temperature > 0 and params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.temperature > 0 and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList(warpers)


def inverse_cdf_sample(scores: Tensor) -> Tensor:
    """Draw one token per row of ``scores`` (B, V) from ``softmax(scores)``: (B,) token ids.

    Inverse transform sampling: one uniform number per row, located in the cumulative distribution. That
    is the distribution ``torch.multinomial`` samples (what ``generate(do_sample=True)`` uses), but
    multinomial draws an exponential variate for every vocabulary entry, B x V per token, which
    dominates CPU decoding at realistic vocabulary sizes (about 45% of a decode step for a 4k
    vocabulary, more at 150k).

    The cumulative sum is in float64: in float32 its rounding (about 3e-8 per entry near 1) would move
    up to ~V x 3e-8 of probability mass between tail tokens, 0.5% at V = 150k.
    """
    wide = torch.float32 if scores.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = torch.softmax(scores.float(), dim=-1).to(wide).cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # about 1
    u = torch.rand(total.shape, device=cdf.device, dtype=cdf.dtype) * total
    # u < total strictly, so a token after the last one with probability mass is never returned.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # the first position with cdf > u


# A sequence that has finished stays in the decode batch (its new tokens discarded) until at least this
# share of the batch has finished; then the finished rows leave the batch and the KV cache. Each
# compaction copies the cache, so compacting on every finish would cost O(batch) copies; this way the
# batch shrinks geometrically, a few dozen copies at most, and no step decodes many dead rows.
COMPACT_FINISHED_SHARE = 0.25


class HFRolloutEngine:
    """Batched sampling on the policy's own transformers model: left-padded prefill, then one token per
    step through the model's KV cache, with temperature / top-p / top-k and EOS handling.

    The decode loop is the project's, not ``generate``'s: it asks the model for the last position's
    logits only, samples with :func:`inverse_cdf_sample` after transformers' warpers, records the sampled
    token's log-prob as it goes (no (B, T, V) logits kept), and drops finished sequences from the batch
    and the cache (see :data:`COMPACT_FINISHED_SHARE`), so a step decodes only what is still running.
    A model's saved ``generation_config`` never applies: the trainer's log-probs assume exactly the
    :class:`SamplingParams` given.

    Args:
        model: the policy's causal LM (shared with the trainer, so ``sync_weights`` is a no-op).
        pad_token_id: the tokenizer's pad id.
        eos_token_id: the id (or ids) that end a response.
        batch_size: sequences per decode batch (prompts x n); bounds generation memory.
        show_progress: a progress bar over decode batches.
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

    def release_memory(self) -> None:  # noqa: D102 - the KV cache lives only inside `generate`
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; the n samples of a prompt are contiguous rows."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        device = next(self.model.parameters()).device
        expanded = [p for p in prompts for _ in range(params.n)]
        was_training = self.model.training
        self.model.eval()
        chunks = []
        starts = range(0, len(expanded), self.batch_size)
        try:
            for start in tqdm(starts, desc="rollout", disable=not self.show_progress, leave=False):
                ids, mask = left_pad(expanded[start : start + self.batch_size], self.pad_token_id, device)
                chunks.append(self._decode(ids, mask, params))
        finally:
            self.model.train(was_training)
        return assemble(
            expanded, chunks, params, pad_token_id=self.pad_token_id, eos_token_ids=self.eos_token_ids
        )

    def _forward_fn(self) -> Any:
        """``f(ids, mask, positions, cache) -> (b, V)`` float logits of the last position, the cache grown by
        ``ids.shape[1]`` positions, in the keyword names this model's ``forward`` takes."""
        accepted = inspect.signature(self.model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache`; older releases take the former.
        cache_name = "cache" if "cache" in accepted else "past_key_values"
        # Only the last position's logits are needed; a remote-code model without `logits_to_keep`
        # computes all of them.
        keep = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

        def forward(ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> Tensor:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_name: cache},
                **keep,
            )
            return out.logits[:, -1].float()

        return forward

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)  # per-layer kinds (sliding windows, ...)
        except TypeError:  # transformers releases before the config argument
            return DynamicCache()

    def _decode(self, ids: Tensor, mask: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor | None]:
        """Sample up to ``max_new_tokens`` for each left-padded row: (b, T) tokens (pad after the end)
        and, when asked for, (b, T) log-probs of the sampled tokens at the sampling temperature."""
        batch, steps = ids.shape[0], params.max_new_tokens
        tokens = ids.new_full((batch, steps), self.pad_token_id)
        logprobs = torch.zeros(batch, steps, device=ids.device) if params.return_logprobs else None
        warpers, scale = _warpers(params), params.temperature if params.temperature > 0 else 1.0
        eos = torch.tensor(self.eos_token_ids, device=ids.device)
        stops = not params.ignore_eos and len(self.eos_token_ids) > 0

        rows = torch.arange(batch, device=ids.device)  # the original row of each row in the decode batch
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        forward, cache = self._forward_fn(), self._new_cache()
        logits = forward(ids, mask, positions, cache)
        positions = positions[:, -1:]
        length = steps
        for t in range(steps):
            next_tokens = (
                logits.argmax(-1) if params.temperature == 0 else inverse_cdf_sample(warpers(None, logits))
            )
            # rows that finished but are still in the batch (until the next compaction) record nothing
            running = ~finished if stops else slice(None)  # without stops: no boolean indexing (no sync)
            tokens[rows[running], t] = next_tokens[running]
            if logprobs is not None:
                picked = torch.log_softmax(logits / scale, -1).gather(-1, next_tokens[:, None]).squeeze(-1)
                logprobs[rows[running], t] = picked[running]
            if stops:
                finished |= torch.isin(next_tokens, eos)
                done = int(finished.sum())
                if done == len(rows):
                    length = t + 1
                    break
                if done >= max(1, COMPACT_FINISHED_SHARE * len(rows)):
                    keep = (~finished).nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    rows, finished, mask = rows[keep], finished[keep], mask[keep]
                    positions, next_tokens = positions[keep], next_tokens[keep]
            if t + 1 < steps:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = positions + 1
                logits = forward(next_tokens[:, None], mask, positions, cache)
        tokens = tokens[:, :length]
        return tokens, None if logprobs is None else logprobs[:, :length]
