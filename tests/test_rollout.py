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


# compact at every finish, the default, never; decode slots fewer than the rows (rows join mid-decode) or not
@pytest.mark.parametrize("share", [0.0, 0.25, 2.0])
@pytest.mark.parametrize("slots", [1, 2, 64])
def test_greedy_decoding_equals_generate_with_early_stops(
    setup, share: float, slots: int, monkeypatch
) -> None:
    tokenizer, model, prompts = setup
    steps = 24
    eos = _common_token(model, tokenizer, prompts, steps)
    want = _generate_greedy(model, tokenizer, prompts, eos, steps)
    lengths = {len(w) for w in want}
    assert len(lengths) >= 2, "the test needs rows that finish at different steps"
    monkeypatch.setattr(hf_rollout, "COMPACT_FINISHED_SHARE", share)
    engine = HFRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, batch_size=slots, show_progress=False
    )
    forwards = []
    build = engine._forward_fn

    def counting_forward():
        forward = build()
        return lambda *args: forwards.append(1) or forward(*args)

    monkeypatch.setattr(engine, "_forward_fn", counting_forward)
    batch = engine.generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=steps, return_logprobs=True)
    )
    # no decode step is spent once every row has finished: a prefill, then one step per further token
    if slots == 1:
        assert len(forwards) == sum(len(w) for w in want)
    elif slots >= len(prompts):
        assert len(forwards) == max(lengths)
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


def _splitmix64_reference(x: int) -> int:
    """splitmix64's output function on Python integers (unsigned 64-bit)."""
    m = (1 << 64) - 1
    x &= m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_mix64_is_splitmix64_with_wrapping_int64_arithmetic() -> None:
    values = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=torch.Generator().manual_seed(0))
    values = torch.cat([values, torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])])
    got = hf_rollout.mix64(values)
    for v, g in zip(values.tolist(), got.tolist(), strict=True):
        assert g & ((1 << 64) - 1) == _splitmix64_reference(v)


def test_stream_uniforms_are_uniform_and_depend_on_key_and_counter_alone() -> None:
    keys = hf_rollout.stream_keys(torch.tensor([11, 12, 13, 14]), 5)  # 20 streams
    assert keys.unique().numel() == 20
    counters = torch.arange(5000)
    draws = torch.stack([hf_rollout.stream_uniforms(k.expand(5000), counters) for k in keys])  # (20, 5000)
    assert draws.dtype == torch.float64 and draws.min() >= 0 and draws.max() < 1
    counts = torch.histc(draws.flatten(), bins=50, min=0, max=1)
    expected = draws.numel() / 50
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 90, chi2  # 49 degrees of freedom: p about 3e-4
    pairs = torch.stack([draws[:, :-1].flatten(), draws[:, 1:].flatten()])
    assert abs(float(torch.corrcoef(pairs)[0, 1])) < 0.02  # consecutive draws uncorrelated
    # a draw is a function of (key, counter): the same from a batch of other rows, in any order
    mixed = hf_rollout.stream_uniforms(keys[[3, 0, 3]], torch.tensor([7, 2, 7]))
    assert mixed[0] == mixed[2] == draws[3, 7] and mixed[1] == draws[0, 2]
    # a prompt's seed alone makes its samples' keys
    again = hf_rollout.stream_keys(torch.tensor([13]), 5)
    assert torch.equal(again, keys[10:15])


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_sampled_responses_do_not_depend_on_the_decode_slots(setup, share: float, monkeypatch) -> None:
    """Continuous batching: the same seeds give the same responses (and log-probs) whether every row
    decodes at once, or rows wait and join the batch as others finish."""
    tokenizer, model, prompts = setup
    monkeypatch.setattr(hf_rollout, "COMPACT_FINISHED_SHARE", share)
    params = SamplingParams(n=6, temperature=0.9, top_p=0.95, max_new_tokens=30, return_logprobs=True)
    seeds = [101, 202, 303, 404, 505]
    joins = []
    concat = hf_rollout._Slots.concat
    monkeypatch.setattr(
        hf_rollout._Slots, "concat", staticmethod(lambda parts: joins.append(len(parts)) or concat(parts))
    )
    batches = {}
    # (decode slots, prefill budget in tokens): 4 tokens prefill one prompt at a time
    for slots, prefill_tokens in ((30, 4096), (7, 4096), (3, 4096), (30, 4), (7, 4)):
        engine = HFRolloutEngine(
            model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            batch_size=slots, prefill_tokens=prefill_tokens, show_progress=False,
        )  # fmt: skip
        joins.clear()
        batches[slots, prefill_tokens] = engine.generate(prompts, params, seeds=seeds)
        if (
            slots == 30 and prefill_tokens == 4
        ):  # 30 rows admitted at once, prefilled a prompt or a few at a time
            assert joins[0] >= 20
        elif slots < 30:  # waiting rows joined running batches
            assert sum(parts > 1 for parts in joins) >= 4
    whole = batches[30, 4096]
    lengths = whole.response_lengths
    assert lengths.min() < 30 and len(set(lengths.tolist())) > 4  # rows end at many different steps
    for slots in ((7, 4096), (3, 4096), (30, 4), (7, 4)):
        assert torch.equal(batches[slots].response_ids, whole.response_ids)
        assert torch.equal(batches[slots].response_mask, whole.response_mask)
        torch.testing.assert_close(
            batches[slots].sampling_logprobs, whole.sampling_logprobs, atol=1e-4, rtol=0
        )
    # the recorded log-probs are the model's at the sampling temperature, after top-p
    for i in range(0, len(seeds) * 6, 5):
        p, response = prompts[i // 6], whole.response_ids[i][whole.response_mask[i].bool()]
        with torch.no_grad():
            logits = model(torch.cat([torch.tensor(p), response])[None]).logits[0, len(p) - 1 : -1]
        expected = torch.log_softmax(logits.float() / 0.9, -1).gather(-1, response[:, None]).squeeze(-1)
        torch.testing.assert_close(
            whole.sampling_logprobs[i][: len(response)], expected, atol=1e-4, rtol=1e-4
        )
    # other seeds, other responses; a prompt's samples differ from one another
    other = HFRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, show_progress=False
    ).generate(prompts, params, seeds=[s + 1 for s in seeds])
    assert not torch.equal(other.response_ids, whole.response_ids)
    assert len({tuple(r.tolist()) for r in whole.response_ids[:6]}) > 1


def test_a_prompts_responses_depend_on_its_seed_not_on_the_other_prompts(setup) -> None:
    tokenizer, model, prompts = setup
    engine = HFRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, show_progress=False
    )
    params = SamplingParams(n=4, max_new_tokens=20)
    together = engine.generate(prompts[:3], params, seeds=[5, 6, 7])
    alone = engine.generate(prompts[1:2], params, seeds=[6])
    width = alone.response_ids.shape[1]
    assert torch.equal(together.response_ids[4:8, :width], alone.response_ids)
    assert bool((together.response_ids[4:8, width:] == tokenizer.pad_token_id).all())
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(prompts[:3], params, seeds=[1, 2])


def test_sliding_window_models_decode_batch_after_batch_with_the_same_responses(setup) -> None:
    """A cache that rows cannot join mid-decode (sliding-window layers) falls back to whole batches."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer, model, prompts = setup
    config = model.config.to_dict() | {
        "use_sliding_window": True,
        "sliding_window": 6,
        "max_window_layers": 0,
    }
    config.pop("layer_types", None)
    torch.manual_seed(4)
    windowed = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    params = SamplingParams(n=3, max_new_tokens=16, return_logprobs=True)
    seeds = [1, 2, 3, 4, 5]
    out = {}
    for slots in (15, 4):
        engine = HFRolloutEngine(
            windowed, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            batch_size=slots, show_progress=False,
        )  # fmt: skip
        prefilled = engine._prefill(prompts[:1], 0, engine._forward_fn(), torch.device("cpu"))
        assert hf_rollout._full_attention_layers(prefilled.cache) is None
        out[slots] = engine.generate(prompts, params, seeds=seeds)
    assert torch.equal(out[4].response_ids, out[15].response_ids)
    torch.testing.assert_close(out[4].sampling_logprobs, out[15].sampling_logprobs, atol=1e-4, rtol=0)
