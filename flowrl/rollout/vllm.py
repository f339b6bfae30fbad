"""Rollout with vLLM, colocated with the trainer on its GPU (``rollout.engine=vllm``; ``flowrl[vllm]``).

vLLM is imported only when this engine is built, so nothing else in the project needs it. The engine
holds its own copy of the policy's weights: the trainer calls :meth:`VLLMRolloutEngine.sync_weights`
after every optimizer step, which streams the policy's parameters into vLLM's model in place (never the
log Z head) and drops vLLM's prefix cache, whose entries were computed with the old weights.

The arrangement is TRL's "colocate" mode (``trl.generation.vllm_generation``, TRL 1.16, vLLM 0.22 to
0.31): one in-process engine per trainer process (``distributed_executor_backend="external_launcher"``),
weights loaded through ``llm_engine.model_executor.driver_worker.model_runner.model.load_weights``.

Sampling follows :class:`~flowrl.rollout.base.SamplingParams`: temperature, top-p, top-k, ``ignore_eos``,
the tokenizer's EOS ids as stop tokens, and a per-request seed: the prompt's own when the caller gives
them (the trainer's ``(seed, step, prompt position)``), else drawn from torch's generator, so vLLM
rollouts are repeatable too (vLLM's streams are its own: not the HF engine's responses). Log-probs, when
asked for, are vLLM's ``processed_logprobs``: after temperature, and after top-k / top-p truncation when
those are set (the HF engine's are before truncation). The trainer recomputes log-probs itself and never
reads these.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.partition import is_log_z_param
from flowrl.rollout.base import RolloutBatch, SamplingParams, assemble

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM and a CUDA GPU: `pip install 'flowrl[vllm]'` (vLLM 0.22 to 0.31, the "
    "range TRL 1.16 is tested with), or set rollout.engine=hf"
)


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


def vllm_sampling_kwargs(params: SamplingParams, eos_token_ids: list[int], seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ``params`` (one request per prompt, n samples)."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0 disables top-k in vLLM too (what TRL passes by default)
        "max_tokens": params.max_new_tokens,
        "ignore_eos": params.ignore_eos,
        "stop_token_ids": [] if params.ignore_eos else list(eos_token_ids),
        "logprobs": 0 if params.return_logprobs else None,  # 0: the sampled token's log-prob only
        "seed": seed,
        "skip_special_tokens": False,
        "detokenize": False,  # the trainer decodes; token ids are what it needs
    }


def completion_row(
    token_ids: list[int],
    logprobs: list[dict[int, Any]] | None,
    finish_reason: str | None,
    eos_token_ids: list[int],
) -> tuple[list[int], list[float] | None]:
    """One vLLM completion as (tokens, log-probs) in the HF engine's convention: a response that ended on
    a stop token includes it (vLLM may leave a stop token out of ``token_ids``; it is put back)."""
    tokens = list(token_ids)
    values = (
        None
        if logprobs is None
        else [float(step[tok].logprob) for step, tok in zip(logprobs, tokens, strict=False)]
    )
    if finish_reason == "stop" and eos_token_ids and (not tokens or tokens[-1] not in eos_token_ids):
        tokens.append(eos_token_ids[0])
        if values is not None:
            values.append(0.0)  # not reported by vLLM for a dropped stop token
    return tokens, values


def weights_for_vllm(named_parameters: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """The policy's parameters as vLLM's ``load_weights`` takes them: the log Z head never leaves the
    trainer (vLLM's model has no such module and would reject or, worse, misplace it)."""
    for name, tensor in named_parameters:
        if not is_log_z_param(name):
            yield name, tensor.detach()


class VLLMRolloutEngine:
    """Sampling with vLLM's ``LLM`` in the trainer's process.

    Args:
        model_path: the policy's starting weights (a local directory or hub id), which vLLM loads itself.
        pad_token_id: the tokenizer's pad id.
        eos_token_id: the id (or ids) that end a response.
        dtype: vLLM's weight dtype ("bfloat16", "float16", "float32", "auto").
        gpu_memory_utilization: the share of the GPU's memory vLLM may take (its weights and KV cache);
            the rest is the trainer's. Lower it when the update runs out of memory.
        max_model_len: prompt + response tokens per sequence.
        seed: vLLM's own seed (per-request seeds come from torch's generator).
        enable_sleep_mode: release vLLM's KV cache (and weights) while the trainer updates.
        trust_remote_code: passed to vLLM.
    """

    def __init__(
        self,
        model_path: str,
        *,
        pad_token_id: int,
        eos_token_id: int | list[int],
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        enable_sleep_mode: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError(INSTALL_HINT)
        self.pad_token_id = pad_token_id
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.enable_sleep_mode = enable_sleep_mode
        self._vllm = vllm
        # The external launcher runs vLLM's engine in this process and reads the torch.distributed
        # environment; a single process gets a world of one.
        for key, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        self.llm = vllm.LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enable_sleep_mode=enable_sleep_mode,
            distributed_executor_backend="external_launcher",
            logprobs_mode="processed_logprobs",
            trust_remote_code=trust_remote_code,
            skip_tokenizer_init=True,  # token ids in, token ids out
        )
        self._asleep = False

    def _model(self) -> nn.Module:
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    @torch.no_grad()
    def sync_weights(self, policy_model: nn.Module) -> None:
        """Copy the policy's current weights into vLLM's model (the log Z head is never sent; a LoRA
        policy's adapters are merged into the weights they adapt, under the plain model's names)."""
        from flowrl.models import merged_weights

        self._wake()
        model = self._model()
        for name, tensor in weights_for_vllm(merged_weights(policy_model)):
            model.load_weights([(name, tensor)])  # one at a time: no second full copy of the weights
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the previous weights

    def _wake(self) -> None:
        if self.enable_sleep_mode and self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def release_memory(self) -> None:
        """Free vLLM's KV cache and offload its weights while the trainer updates (``enable_sleep_mode``)."""
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; the n samples of a prompt are contiguous rows.
        ``seeds`` (one per prompt) seed the requests; without them they come from torch's generator."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        self._wake()
        if seeds is None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        sampling = [
            self._vllm.SamplingParams(**vllm_sampling_kwargs(params, self.eos_token_ids, s % (2**31 - 1)))
            for s in seeds
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], sampling_params=sampling, use_tqdm=False
        )
        device = torch.device("cuda", torch.cuda.current_device())
        rows = [
            completion_row(
                c.token_ids,
                c.logprobs if params.return_logprobs else None,
                c.finish_reason,
                self.eos_token_ids,
            )
            for request in outputs
            for c in request.outputs
        ]
        width = max(1, max(len(tokens) for tokens, _ in rows))
        tokens = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width) if params.return_logprobs else None
        for i, (ids, values) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            if logprobs is not None and values is not None:
                logprobs[i, : len(values)] = torch.tensor(values)
        expanded = [p for p in prompts for _ in range(params.n)]
        return assemble(
            expanded,
            tokens.to(device),
            None if logprobs is None else logprobs.to(device),
            params,
            pad_token_id=self.pad_token_id,
            eos_token_ids=self.eos_token_ids,
        )
