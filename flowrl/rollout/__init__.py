"""Rollout engines behind one interface: :class:`RolloutEngine` (transformers first; vLLM can follow)."""

from flowrl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from flowrl.rollout.hf import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutBatch", "RolloutEngine", "SamplingParams"]
