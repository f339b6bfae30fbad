"""Rollout engines behind one interface, :class:`RolloutEngine`: :class:`HFRolloutEngine` (transformers,
on the policy itself) and, imported only when chosen, :class:`flowrl.rollout.vllm.VLLMRolloutEngine`."""

from flowrl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from flowrl.rollout.hf import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutBatch", "RolloutEngine", "SamplingParams"]
