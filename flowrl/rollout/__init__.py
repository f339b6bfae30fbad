"""Rollout engines behind one interface, :class:`RolloutEngine`: :class:`HFRolloutEngine` (transformers,
on the policy itself) and, imported only when chosen, :class:`flowrl.rollout.vllm.VLLMRolloutEngine`."""

from __future__ import annotations

from typing import Any

from torch import nn

from flowrl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from flowrl.rollout.hf import HFRolloutEngine


def build_engine(cfg: Any, model: nn.Module, tokenizer: Any, *, show_progress: bool) -> RolloutEngine:
    """The engine ``cfg.rollout.engine`` names, for the policy ``model`` (a :class:`flowrl.config.Config`)."""
    r, m = cfg.rollout, cfg.model
    if r.engine == "vllm":
        from flowrl.rollout.vllm import VLLMRolloutEngine  # vLLM is imported only when chosen

        return VLLMRolloutEngine(
            m.path,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            dtype=r.vllm_dtype,
            gpu_memory_utilization=r.gpu_memory_utilization,
            max_model_len=cfg.data.max_prompt_length + r.max_new_tokens,
            seed=cfg.train.seed,
            enable_sleep_mode=r.enable_sleep_mode,
            trust_remote_code=m.trust_remote_code,
        )
    return HFRolloutEngine(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        batch_size=r.batch_size,
        prefill_tokens=r.prefill_tokens,
        show_progress=show_progress,
    )


__all__ = ["HFRolloutEngine", "RolloutBatch", "RolloutEngine", "SamplingParams", "build_engine"]
