"""Rollout on the policy's own transformers model (no weight copy to sync), with the project's decode loop:
continuous batching over a fixed number of decode slots, and counter-based per-sequence random streams."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowrl.config import DEFAULT_PREFILL_TOKENS
from flowrl.rollout.base import RolloutBatch, SamplingParams, assemble, left_pad
from flowrl.streams import mix64, stream_keys, stream_uniforms  # noqa: F401 - mix64: part of this API


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


def inverse_cdf_sample(scores: Tensor, uniforms: Tensor | None = None) -> Tensor:
    """Draw one token per row of ``scores`` (B, V) from ``softmax(scores)``: (B,) token ids.

    Inverse transform sampling: one uniform number per row (``uniforms`` (B,) in [0, 1), or fresh ones
    from torch's generator), located in the cumulative distribution. That is the distribution
    ``torch.multinomial`` samples (what ``generate(do_sample=True)`` uses), but multinomial draws an
    exponential variate for every vocabulary entry, B x V per token, which dominates CPU decoding at
    realistic vocabulary sizes (about 45% of a decode step for a 4k vocabulary, more at 150k).

    The cumulative sum is in float64: in float32 its rounding (about 3e-8 per entry near 1) would move
    up to ~V x 3e-8 of probability mass between tail tokens, 0.5% at V = 150k.
    """
    wide = torch.float32 if scores.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = torch.softmax(scores.float(), dim=-1).to(wide).cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # about 1
    if uniforms is None:
        u = torch.rand(total.shape, device=cdf.device, dtype=cdf.dtype)
    else:
        u = uniforms.to(device=cdf.device, dtype=cdf.dtype)[:, None]
    u = u * total
    # u < total strictly, so a token after the last one with probability mass is never returned.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # the first position with cdf > u


# A sequence that has finished by EOS stays in the decode batch (its new tokens land after its end and
# are discarded) until at least this share of the batch has finished; then the finished rows leave the
# batch and the KV cache, and waiting prompts take their slots once this share of the slots is free.
# Each compaction or admission copies the cache, so doing it on every finish would cost O(batch) copies;
# this way there are a few dozen at most, and no step decodes many dead rows.
COMPACT_FINISHED_SHARE = 0.25


def _plain_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when every one is a plain full-attention ``DynamicLayer`` (keys and values
    (b, heads, L, d), one position per column), which rows can join and leave; None otherwise (sliding
    windows, linear attention, older transformers), and the engine then decodes batch after batch.
    Known from the model's config, before anything is cached."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return list(layers)


def _full_attention_layers(cache: Any) -> list[Any] | None:
    """:func:`_plain_layers` of a cache that holds something (every layer initialized)."""
    layers = _plain_layers(cache)
    return layers if layers is not None and all(layer.is_initialized for layer in layers) else None


def _left_pad_columns(x: Tensor, width: int) -> Tensor:
    """``x`` (..., L, d) or (b, L) padded on the left of its sequence axis to ``width`` columns."""
    if x.dim() == 2:
        return F.pad(x, (width - x.shape[1], 0))
    return F.pad(x, (0, 0, width - x.shape[-2], 0))


@dataclass
class _Slots:
    """The sequences being decoded: each row's original index, tokens produced so far, whether it has
    produced EOS, its attention mask and last position, the shared KV cache and the next-token logits."""

    rows: Tensor  # (b,) original row indices
    produced: Tensor  # (b,) tokens sampled so far, on the device
    produced_host: Tensor  # (b,) the same on the CPU: decisions about lengths need no device sync
    eos_seen: Tensor  # (b,) bool
    mask: Tensor  # (b, L) 1 on real cached positions; L is the cache length
    positions: Tensor  # (b, 1) position id of each row's last token
    cache: Any
    logits: Tensor  # (b, V) float logits for each row's next token

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: Tensor) -> _Slots | None:
        """Only the rows ``keep`` (host indices into the batch); None when it is empty. Columns that are
        padding in every remaining row are cut from the left of the mask and the cache."""
        if len(keep) == 0:
            return None
        idx = keep.to(self.rows.device)
        self.cache.batch_select_indices(idx)
        mask = self.mask[idx]
        lead = int(mask.any(0).long().argmax())  # first column that some row still attends to
        layers = _full_attention_layers(self.cache) if lead else None
        if layers is not None:
            for layer in layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            mask = mask[:, lead:]
        return _Slots(
            self.rows[idx], self.produced[idx], self.produced_host[keep], self.eos_seen[idx], mask,
            self.positions[idx], self.cache, self.logits[idx],
        )  # fmt: skip

    @staticmethod
    def concat(parts: list[_Slots]) -> _Slots:
        """The rows of all ``parts`` in one batch: their caches left-padded to the longest and concatenated
        layer by layer (one layer's copy at a time beside the caches), into the first part's cache."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.mask.shape[1] for p in parts)
        layers = [_full_attention_layers(p.cache) for p in parts]
        assert all(ls is not None and len(ls) == len(layers[0]) for ls in layers)  # type: ignore[arg-type]
        for per_part in zip(*layers, strict=True):
            per_part[0].keys = torch.cat([_left_pad_columns(la.keys, width) for la in per_part])
            per_part[0].values = torch.cat([_left_pad_columns(la.values, width) for la in per_part])
            for la in per_part[1:]:
                la.keys = la.values = None  # this layer's copy is in the first part's cache now

        def cat(name: str) -> Tensor:
            return torch.cat([getattr(p, name) for p in parts])

        return _Slots(
            cat("rows"), cat("produced"), cat("produced_host"), cat("eos_seen"),
            torch.cat([_left_pad_columns(p.mask, width) for p in parts]),
            cat("positions"), parts[0].cache, cat("logits"),
        )  # fmt: skip


class HFRolloutEngine:
    """Batched sampling on the policy's own transformers model, with continuous batching: up to
    ``batch_size`` sequences decode together, one token per step through the model's KV cache, and
    waiting prompts are prefilled into the slots that finished sequences free, so the batch stays full
    while any prompt waits (a batch-at-a-time loop would decode ever fewer rows until its longest one
    ends). Temperature / top-p / top-k and EOS handling as in ``generate``.

    The decode loop is the project's, not ``generate``'s: it asks the model for the last position's
    logits only, samples with :func:`inverse_cdf_sample` after transformers' warpers, records the sampled
    token's log-prob as it goes (no (B, T, V) logits kept), and drops finished sequences from the batch
    and the cache (see :data:`COMPACT_FINISHED_SHARE`), so a step decodes only what is still running.
    Every sequence draws from its own counter-based random stream (:func:`stream_uniforms`), keyed by its
    prompt's seed and its sample index: its response does not depend on ``batch_size``, on the other
    prompts in the call, or on when it got a slot. A model's saved ``generation_config`` never applies:
    the trainer's log-probs assume exactly the :class:`SamplingParams` given.

    Models whose cache is not plain full attention (sliding windows, linear attention) cannot take new
    rows mid-decode; they decode ``batch_size`` sequences at a time, with the same responses.

    Args:
        model: the policy's causal LM (shared with the trainer, so ``sync_weights`` is a no-op).
        pad_token_id: the tokenizer's pad id.
        eos_token_id: the id (or ids) that end a response.
        batch_size: decode slots (sequences decoded together); bounds generation memory.
        prefill_tokens: prompts admitted together are prefilled in groups of at most this many (padded)
            tokens, at least one prompt each, and joined into the batch: the prefill's activations are
            bounded by this budget, not by the number of decode slots (models whose cache cannot take
            rows mid-decode prefill a batch at once).
        show_progress: a progress bar over finished sequences.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | list[int],
        batch_size: int = 64,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        show_progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size (decode slots) must be >= 1, got {batch_size}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
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
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; the n samples of a prompt are contiguous rows.

        ``seeds`` (one int per prompt) keys the samples' random streams; without them the keys are drawn
        from torch's generator, so ``torch.manual_seed`` makes a call repeatable.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        device = next(self.model.parameters()).device
        expanded = [p for p in prompts for _ in range(params.n)]
        prompt_seeds = (
            torch.tensor([s & (2**63 - 1) for s in seeds], dtype=torch.long)
            if seeds is not None
            else torch.randint(0, 2**62, (len(prompts),))
        )
        keys = stream_keys(prompt_seeds, params.n).to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            tokens, logprobs = self._decode(expanded, keys, params)
        finally:
            self.model.train(was_training)
        return assemble(
            expanded,
            tokens,
            logprobs,
            params,
            pad_token_id=self.pad_token_id,
            eos_token_ids=self.eos_token_ids,
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

    def _prefill_groups(
        self, prompts: list[list[int]], first: int, forward: Any, device: torch.device
    ) -> _Slots:
        """Rows ``first, first + 1, ...`` for ``prompts``, prefilled in groups of at most
        ``prefill_tokens`` padded tokens (at least one prompt each) and joined."""
        parts, start = [], 0
        while start < len(prompts):
            end, longest = start + 1, len(prompts[start])
            while (
                end < len(prompts)
                and (end + 1 - start) * max(longest, len(prompts[end])) <= self.prefill_tokens
            ):
                longest = max(longest, len(prompts[end]))
                end += 1
            parts.append(self._prefill(prompts[start:end], first + start, forward, device))
            start = end
        return _Slots.concat(parts)

    def _prefill(self, prompts: list[list[int]], first: int, forward: Any, device: torch.device) -> _Slots:
        """Rows ``first, first + 1, ...`` for ``prompts``: the prompts through the model, left-padded."""
        ids, mask = left_pad(prompts, self.pad_token_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = forward(ids, mask, positions, cache)
        b = len(prompts)
        return _Slots(
            rows=torch.arange(first, first + b, device=device),
            produced=torch.zeros(b, dtype=torch.long, device=device),
            produced_host=torch.zeros(b, dtype=torch.long),
            eos_seen=torch.zeros(b, dtype=torch.bool, device=device),
            mask=mask,
            positions=positions[:, -1:],
            cache=cache,
            logits=logits,
        )

    def _decode(
        self, prompts: list[list[int]], keys: Tensor, params: SamplingParams
    ) -> tuple[Tensor, Tensor | None]:
        """Sample up to ``max_new_tokens`` for every prompt (one row each, ``keys`` its random stream):
        (N, T) tokens (anything after a row's end is ignored) and, when asked for, (N, T) log-probs of the
        sampled tokens at the sampling temperature."""
        device, total, steps = keys.device, len(prompts), params.max_new_tokens
        tokens = torch.full((total, steps), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(total, steps, device=device) if params.return_logprobs else None
        warpers, scale = _warpers(params), params.temperature if params.temperature > 0 else 1.0
        eos = torch.tensor(self.eos_token_ids, device=device)
        stops = not params.ignore_eos and len(self.eos_token_ids) > 0
        threshold = max(1, int(COMPACT_FINISHED_SHARE * self.batch_size))
        forward = self._forward_fn()
        bar = tqdm(total=total, desc="rollout", unit="seq", disable=not self.show_progress, leave=False)

        slots: _Slots | None = None
        waiting = 0  # the next row to admit
        joinable = _plain_layers(self._new_cache()) is not None  # rows may join and leave mid-decode
        prefill = self._prefill_groups if joinable else self._prefill
        while True:
            free = self.batch_size - (len(slots) if slots is not None else 0)
            if waiting < total and (slots is None or (joinable and free >= threshold)):
                take = min(free, total - waiting)
                new = prefill(prompts[waiting : waiting + take], waiting, forward, device)
                slots = new if slots is None else _Slots.concat([slots, new])
                waiting += take
            if slots is None:
                break

            logits = slots.logits
            if params.temperature == 0:
                next_tokens = logits.argmax(-1)
            else:
                uniforms = stream_uniforms(keys[slots.rows], slots.produced)
                next_tokens = inverse_cdf_sample(warpers(None, logits), uniforms)
            # A row past its EOS writes after its end (assemble discards it); a row never writes past T.
            tokens[slots.rows, slots.produced] = next_tokens
            if logprobs is not None:
                picked = torch.log_softmax(logits / scale, -1).gather(-1, next_tokens[:, None]).squeeze(-1)
                logprobs[slots.rows, slots.produced] = picked
            slots.produced += 1
            slots.produced_host += 1
            at_length = slots.produced_host >= steps
            if stops:
                slots.eos_seen |= torch.isin(next_tokens, eos)
                finished = slots.eos_seen.cpu() | at_length  # the one device sync of a step
            else:
                finished = at_length
            done = int(finished.sum())
            # Rows at max_new_tokens must leave now; rows past EOS once enough of the batch has finished
            # (or all of it).
            if (
                bool(at_length.any())
                or done == len(slots)
                or done >= max(1, COMPACT_FINISHED_SHARE * len(slots))
            ):
                bar.update(done)
                keep = (~finished).nonzero().squeeze(-1)
                next_tokens = next_tokens[keep.to(device)]
                slots = slots.select(keep)
            if slots is None:
                continue
            slots.mask = torch.cat([slots.mask, slots.mask.new_ones(len(slots), 1)], dim=1)
            slots.positions = slots.positions + 1
            slots.logits = forward(next_tokens[:, None], slots.mask, slots.positions, slots.cache)
        bar.close()
        width = _longest_response(tokens, eos, steps) if stops else steps
        return tokens[:, :width], None if logprobs is None else logprobs[:, :width]


def _longest_response(tokens: Tensor, eos: Tensor, steps: int) -> int:
    """The longest response in ``tokens`` (N, T): up to and including a row's first EOS, else all T."""
    is_eos = torch.isin(tokens, eos)
    lengths = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, steps)
    return int(lengths.max())
