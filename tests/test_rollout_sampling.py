"""The HF engine's sampling options the benchmarks and the trainer rely on: ``SamplingParams.ignore_eos``,
the inverse-CDF sampler drawing from the softmax, temperature and top-k, and no generation settings leaking
in from a model's saved generation config (statistical checks at about 6 sigma)."""

from __future__ import annotations

import pytest
import torch

from flowrl.data import synthetic
from flowrl.rollout import HFRolloutEngine, SamplingParams
from flowrl.rollout.hf import inverse_cdf_sample

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def engine() -> tuple[HFRolloutEngine, object, list[int]]:
    tokenizer = synthetic.build_tokenizer()
    model = synthetic.build_tiny_model(tokenizer, seed=0, **TINY)
    engine = HFRolloutEngine(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        batch_size=4096,
        show_progress=False,
    )
    return engine, tokenizer, tokenizer("sum 7:")["input_ids"]


def test_ignore_eos_runs_every_response_to_max_new_tokens(engine) -> None:
    eng, tokenizer, prompt = engine
    torch.manual_seed(0)
    stopping = eng.generate([prompt], SamplingParams(n=64, max_new_tokens=40))
    assert stopping.response_lengths.min() < 40  # this model samples EOS (about 4% per token)
    torch.manual_seed(0)
    fixed = eng.generate([prompt], SamplingParams(n=64, max_new_tokens=40, ignore_eos=True))
    assert fixed.response_ids.shape == (64, 40)
    assert bool((fixed.response_mask == 1).all()) and bool(fixed.truncated.all())
    assert int((fixed.response_ids == tokenizer.eos_token_id).sum()) > 0  # EOS is sampled, not banned


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    support = expected > 0
    chi2 = float((((counts - expected) ** 2)[support] / expected[support]).sum())
    return chi2, int(support.sum()) - 1


def test_inverse_cdf_sampler_draws_from_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    logits[[3, 17]] = float("-inf")  # tokens a top-k / top-p warper removed
    draws = 40_000
    tokens = inverse_cdf_sample(logits.expand(draws, -1).clone())
    counts = torch.bincount(tokens, minlength=50).float()
    assert counts[[3, 17]].sum() == 0
    chi2, dof = _chi_square(counts, torch.softmax(logits, -1))
    assert chi2 < dof + 6 * (2 * dof) ** 0.5  # about 6 sigma: fails on a wrong distribution, not on noise


def test_engine_samples_at_temperature_and_top_k(engine) -> None:
    eng, _, prompt = engine
    torch.manual_seed(0)
    batch = eng.generate([prompt], SamplingParams(n=20_000, temperature=0.7, top_k=5, max_new_tokens=1))
    counts = torch.bincount(batch.response_ids[:, 0], minlength=eng.model.config.vocab_size).float()
    with torch.no_grad():
        logits = eng.model(torch.tensor([prompt])).logits[0, -1] / 0.7
    kept = logits >= logits.topk(5).values[-1]
    probs = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1)
    assert counts[~kept].sum() == 0
    chi2, dof = _chi_square(counts, probs)
    assert chi2 < dof + 6 * (2 * dof) ** 0.5


def test_a_saved_generation_config_does_not_change_sampling(engine) -> None:
    from transformers import GenerationConfig

    eng, _, prompt = engine
    saved = GenerationConfig(do_sample=True, top_k=1, repetition_penalty=50.0, temperature=0.1)
    eng.model.generation_config = saved
    try:
        torch.manual_seed(0)
        batch = eng.generate([prompt], SamplingParams(n=256, max_new_tokens=1))
    finally:
        eng.model.generation_config = GenerationConfig()
    assert len(set(batch.response_ids[:, 0].tolist())) > 3  # top_k=1 or temperature 0.1 would give ~1
    assert eng.model.generation_config is not saved  # restored to what it was before the call
