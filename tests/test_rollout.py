"""The decode loop of HFRolloutEngine against transformers' own ``generate`` and the model's forward."""

from __future__ import annotations

import pytest
import torch

from flowrl.data import synthetic
from flowrl.rollout import HFRolloutEngine, SamplingParams
from flowrl.rollout import hf as hf_rollout


@pytest.fixture(scope="module")
def setup():
    tokenizer = synthetic.build_tokenizer()
    model = synthetic.build_tiny_model(tokenizer, seed=3, hidden_size=32, num_layers=2, num_heads=2).eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("sum 7:", "sum 1234:", "sum 56:", "s", "sum 9999999:")]
    return tokenizer, model, prompts


def _generate_greedy(
    model, tokenizer, prompts: list[list[int]], eos: int | None, steps: int
) -> list[list[int]]:
    """transformers' generate, greedy, one prompt at a time (no padding): the reference."""
    out = []
    for p in prompts:
        seq = model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            eos_token_id=[] if eos is None else eos,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(p) :].tolist()
        out.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return out


def _common_token(model, tokenizer, prompts, steps: int) -> int:
    """A token that greedy decoding first reaches at different steps in different rows, to serve as EOS,
    so rows finish at different times and the batch is compacted mid-decode."""
    firsts: dict[int, list[int]] = {}
    for seq in _generate_greedy(model, tokenizer, prompts, eos=None, steps=steps):
        for tok in set(seq):
            firsts.setdefault(tok, []).append(seq.index(tok))
    return max(firsts, key=lambda tok: (len(set(firsts[tok])), len(firsts[tok])))


@pytest.mark.parametrize("share", [0.0, 0.25, 2.0])  # compact at every finish, the default, never
def test_greedy_decoding_equals_generate_with_early_stops(setup, share: float, monkeypatch) -> None:
    tokenizer, model, prompts = setup
    steps = 24
    eos = _common_token(model, tokenizer, prompts, steps)
    want = _generate_greedy(model, tokenizer, prompts, eos, steps)
    lengths = {len(w) for w in want}
    assert len(lengths) >= 2, "the test needs rows that finish at different steps"
    monkeypatch.setattr(hf_rollout, "COMPACT_FINISHED_SHARE", share)
    engine = HFRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, show_progress=False
    )
    batch = engine.generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=steps, return_logprobs=True)
    )
    for i, expected in enumerate(want):
        got = batch.response_ids[i][batch.response_mask[i].bool()].tolist()
        assert got == expected
        assert bool(batch.truncated[i]) == (expected[-1] != eos)
    assert batch.response_ids.shape[1] == max(lengths)
    # greedy log-probs are the model's own (temperature 0 is scored at temperature 1)
    for i, p in enumerate(prompts):
        response = batch.response_ids[i][batch.response_mask[i].bool()]
        with torch.no_grad():
            logits = model(torch.cat([torch.tensor(p), response])[None]).logits[0, len(p) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, response[:, None]).squeeze(-1)
        torch.testing.assert_close(
            batch.sampling_logprobs[i][: len(response)], expected, atol=1e-4, rtol=1e-4
        )
        assert torch.all(batch.sampling_logprobs[i][len(response) :] == 0)


def test_sampled_rows_stop_at_their_own_eos(setup) -> None:
    tokenizer, model, prompts = setup
    engine = HFRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, show_progress=False
    )
    torch.manual_seed(0)
    batch = engine.generate(prompts[:2], SamplingParams(n=64, max_new_tokens=40))
    lengths = batch.response_lengths
    assert lengths.min() < 40 and len(set(lengths.tolist())) > 5  # rows finish at many different steps
    eos = batch.response_ids == tokenizer.eos_token_id
    for i in range(batch.response_ids.shape[0]):
        n = int(lengths[i])
        real = batch.response_ids[i, :n]
        if bool(batch.truncated[i]):
            assert n == 40 and not bool(eos[i, :n].any())
        else:  # exactly one EOS, the last real token; pad (here the EOS id too) after it
            assert int(real[-1]) == tokenizer.eos_token_id and int(eos[i, : n - 1].sum()) == 0
        assert bool((batch.response_ids[i, n:] == tokenizer.pad_token_id).all())


def test_a_model_left_in_training_mode_is_restored(setup) -> None:
    tokenizer, model, prompts = setup
    engine = HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=2, show_progress=False)
    model.train()
    try:
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()
