"""The paper-reproduction presets in configs/ load and validate, and keep the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowrl.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


# spec section 4: (prompts per step, optimizer steps per rollout batch, rollout temperature)
PAPER = {
    "paper_qwen2.5-7b_math": (512, 16, 1.0),
    "paper_qwen2.5-32b_math": (512, 16, 1.0),
    "paper_r1-distill-qwen-7b_code": (64, 2, 0.6),
}


def test_every_preset_is_checked() -> None:
    assert sorted(p.stem for p in CONFIGS) == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_validates_with_the_papers_settings(name: str) -> None:
    cfg = load_config(str(CONFIGS[0].parent / f"{name}.yaml"), [])
    prompts, optimizer_steps, temperature = PAPER[name]
    assert cfg.algorithm.name == "flowrl"
    assert cfg.algorithm.loss.get("beta", 15.0) == 15.0
    assert cfg.rollout.num_samples_per_prompt == 8 and cfg.rollout.temperature == temperature
    assert cfg.train.prompts_per_step == prompts
    assert prompts * 8 // cfg.train.mini_batch_size * cfg.train.epochs_per_rollout == optimizer_steps
    assert (cfg.data.max_prompt_length, cfg.rollout.max_new_tokens) == (2048, 8192)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-6, 0.1, 1.0)
    assert cfg.optim.warmup_steps == 10
