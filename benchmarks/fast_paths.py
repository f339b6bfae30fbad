"""The fast paths of issue 7, each timed against the code it replaced, on this machine.

    .venv/bin/python benchmarks/fast_paths.py --json outputs/bench/fast_paths_cpu.json

* **sampling** (``flowrl.rollout.hf.inverse_cdf_sample``): one next token per row of (B, V) logits.
  Before: ``torch.multinomial(softmax(logits), 1)``, what ``generate(do_sample=True)`` does, which draws
  an exponential variate per vocabulary entry. After: inverse-CDF sampling, one uniform per row (a float64
  cumulative sum), then the argmax ``generate`` takes of the one-hot scores. Same distribution.
* **log-probs with entropy** (``flowrl.policy.token_logprobs(..., with_entropy=True)``), without gradient
  (the reference and old-policy passes) and with (the update), three generations of the code:
  ``two_projections`` (the first version: the output projection ran twice per token, once for the
  log-probs and once more for the entropy), ``autograd`` (one projection per chunk for both, the chunk
  recomputed in backward by activation checkpointing: ``fused=False``, still the path for heads that are
  not a plain ``nn.Linear``) and ``fused`` (``_LinearLogprobs``: logits freed after the forward, rebuilt
  once in backward and turned into their gradient in place; the default).

* **decoding** (``HFRolloutEngine``'s own decode loop) against ``model.generate(do_sample=True)``, what
  a transformers user runs, and against ``generate`` with the inverse-CDF sampler as a logits processor
  (the engine before the decode loop), on the CPU preset's model (1.5M parameters, V 4k), 8 prompts x
  4 samples, up to 64 tokens: ``fixed`` runs every row to 64 tokens (``ignore_eos`` / ``min_new_tokens``);
  ``early_stops`` makes 128 of the 4,096 tokens end a response, so lengths are geometric (mean 24 to
  28 in the runs made) as they vary in real rollouts, and the loop drops finished rows from the batch
  while ``generate`` keeps decoding them until the longest is done.

* **continuous batching** (``HFRolloutEngine(batch_size=...)`` given every prompt at once): 64 prompts
  x 4 samples on 32 decode slots, the ``early_stops`` workload. Before: batch after batch, one
  ``generate`` call per 8 prompts (what the trainer did), each running until its longest row ends. After:
  one call; waiting sequences take the slots of finished ones. Per-sequence random streams make both
  produce the same responses (checked), so only the scheduling differs. Also counted: model forwards
  (prefills and decode steps), which is what a decode step costs on a memory-bound GPU, whatever its rows.

* **micro-batch padding** (``flowrl.batching.by_length``): tokens the update computes (every micro-batch
  trimmed to its longest sequence) when micro-batches are cut from length-sorted rows, against cutting
  them in the mini-batch's shuffled order, for 256 sequences of RL-like lengths (prompts 50-300 tokens,
  responses log-normal around 1,000 tokens, capped at 4,096), micro-batches of 8. A count, not a time.

Medians of ``--repeats`` timings; the shapes are the CPU preset's vocabulary (4k) and Qwen2.5's (152k).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def previous_token_logprobs(hidden: Any, targets: Any, lm_head: Any, chunk_size: int) -> tuple[Any, Any]:
    """The replaced implementation: log-probs (checkpointed when differentiable) and a second projection
    for the entropy."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk(h: Any, y: Any) -> Any:
        logits = lm_head(h).float()
        return logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    out, ent = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        out.append(checkpoint(chunk, h, y, use_reentrant=False) if hidden.requires_grad else chunk(h, y))
        with torch.no_grad():
            logp = F.log_softmax(lm_head(h.detach()).float(), dim=-1)
            ent.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out), torch.cat(ent)


LOGPROB_VARIANTS = ("two_projections", "autograd", "fused")


class _OneHotSampler:
    """The previous engine's sampling inside ``generate``: a logits processor that draws the token by
    inverse CDF and returns one-hot scores, ``generate`` then running greedily on them."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        from flowrl.rollout.hf import inverse_cdf_sample

        drawn = inverse_cdf_sample(scores)[:, None]
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


DECODERS = ("generate", "generate_inverse_cdf", "engine")


def micro_batch_padding(sequences: int = 256, micro: int = 8) -> dict[str, Any]:
    """Tokens computed per update with and without length grouping (see the module docstring)."""
    import torch

    from flowrl.batching import by_length, micro_batch
    from flowrl.rollout import RolloutBatch

    g = torch.Generator().manual_seed(0)
    prompt_len = torch.randint(50, 301, (sequences,), generator=g)
    response_len = (torch.randn(sequences, generator=g) * 0.8 + 6.9).exp().round().clamp(1, 4096).long()
    p, t = int(prompt_len.max()), int(response_len.max())
    prompt_mask = (torch.arange(p)[None] >= (p - prompt_len)[:, None]).long()  # left-padded
    response_mask = (torch.arange(t)[None] < response_len[:, None]).long()
    rollout = RolloutBatch(prompt_mask.clone(), prompt_mask, response_mask.clone(), response_mask,
                           response_len == t)  # fmt: skip
    rows = torch.randperm(sequences, generator=g)  # a shuffled mini-batch, as the trainer draws it

    def computed(order: Any) -> int:
        return sum(
            micro_batch(rollout, order[i : i + micro]).input_ids.numel() for i in range(0, sequences, micro)
        )

    real = int(prompt_len.sum() + response_len.sum())
    before, after = computed(rows), computed(by_length(rows, rollout))
    print(
        f"micro-batch padding, {sequences} sequences, micro-batches of {micro}: {real:,} real tokens; "
        f"computed {before:,} in shuffled order -> {after:,} length-grouped ({before / after:.2f}x fewer)"
    )
    return {"sequences": sequences, "micro_batch": micro, "real_tokens": real,
            "computed_shuffled": before, "computed_grouped": after, "ratio": before / after}  # fmt: skip


def decoding(repeats: int, device: Any) -> list[dict[str, Any]]:
    """``generate(do_sample=True)``, ``generate`` with the previous engine's inverse-CDF processor, and
    ``HFRolloutEngine``'s decode loop, on the same prompts, both workloads."""
    from transformers import LogitsProcessorList

    from flowrl.policy import encode_prompt
    from flowrl.rollout import HFRolloutEngine, SamplingParams
    from flowrl.rollout.base import left_pad

    tokenizer = _common.build_tokenizer(_common.MODEL_SHAPES["small"]["vocab_size"])
    model = _common.build_model("small", tokenizer).to(device).eval()
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in _common.prompt_rows(8)]
    samples, steps = 4, 64
    ids, mask = left_pad([p for p in prompts for _ in range(samples)], tokenizer.pad_token_id, device)
    rows = []
    for workload, stop_ids in [("fixed", []), ("early_stops", list(range(1000, 1128)))]:
        engine = HFRolloutEngine(
            model, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, batch_size=len(ids),
            show_progress=False,
        )  # fmt: skip
        params = SamplingParams(n=samples, max_new_tokens=steps, ignore_eos=not stop_ids)
        lengths: dict[str, float] = {}

        def run(decoder: str, stop_ids: list[int] = stop_ids, engine: Any = engine, params: Any = params,
                lengths: dict[str, float] = lengths) -> None:  # fmt: skip
            if decoder == "engine":
                lengths["engine_mean"] = float(
                    engine.generate(prompts, params).response_lengths.float().mean()
                )
                return
            one_hot = decoder == "generate_inverse_cdf"
            out = model.generate(
                ids, attention_mask=mask, do_sample=not one_hot, **({} if one_hot else {"top_k": 0}),
                max_new_tokens=steps,
                min_new_tokens=0 if stop_ids else steps, eos_token_id=stop_ids or None,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([_OneHotSampler()] if one_hot else []),
            )  # fmt: skip
            lengths["generate_batch_length"] = out.shape[1] - ids.shape[1]

        ms = {d: median_time(lambda d=d: run(d), repeats) * 1e3 for d in DECODERS}
        rows.append(
            {"workload": workload, "sequences": len(ids), "max_new_tokens": steps,
             **{f"{d}_ms": t for d, t in ms.items()},
             "speedup_vs_generate": ms["generate"] / ms["engine"],
             "speedup_vs_generate_inverse_cdf": ms["generate_inverse_cdf"] / ms["engine"],
             "engine_mean_length": lengths["engine_mean"],
             "generate_batch_length": lengths["generate_batch_length"]}
        )  # fmt: skip
        print(
            f"decoding {workload}, {len(ids)} x up to {steps} tokens (engine mean length "
            f"{lengths['engine_mean']:.1f}): " + " -> ".join(f"{d} {t:.0f} ms" for d, t in ms.items())
        )
    return rows


def continuous_batching(repeats: int, device: Any) -> dict[str, Any]:
    """Batch-at-a-time against continuous batching on the same seeds (see the module docstring)."""
    import torch

    from flowrl.policy import encode_prompt
    from flowrl.rollout import HFRolloutEngine, SamplingParams

    tokenizer = _common.build_tokenizer(_common.MODEL_SHAPES["small"]["vocab_size"])
    model = _common.build_model("small", tokenizer).to(device).eval()
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in _common.prompt_rows(64)]
    seeds, samples, slots, per_call = list(range(len(prompts))), 4, 32, 8
    engine = HFRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_id=list(range(1000, 1128)), batch_size=slots,
        show_progress=False,
    )  # fmt: skip
    params = SamplingParams(n=samples, max_new_tokens=64)
    out: dict[str, Any] = {}
    forwards = {"calls": 0}  # model forwards (prefills + decode steps): what a memory-bound GPU pays for
    build_forward = engine._forward_fn

    def counting_forward() -> Any:
        forward = build_forward()

        def counted(*args: Any) -> Any:
            forwards["calls"] += 1
            return forward(*args)

        return counted

    engine._forward_fn = counting_forward  # type: ignore[method-assign]

    def count(fn: Any) -> int:
        forwards["calls"] = 0
        fn()
        return forwards["calls"]

    def batch_at_a_time() -> None:
        out["before"] = [
            engine.generate(prompts[i : i + per_call], params, seeds=seeds[i : i + per_call])
            for i in range(0, len(prompts), per_call)
        ]

    def continuous() -> None:
        out["after"] = engine.generate(prompts, params, seeds=seeds)

    before, after = median_time(batch_at_a_time, repeats), median_time(continuous, repeats)
    calls_before, calls_after = count(batch_at_a_time), count(continuous)
    lengths = out["after"].response_lengths
    same = all(
        torch.equal(
            b.response_ids,
            out["after"].response_ids[
                i * per_call * samples : (i + 1) * per_call * samples, : b.response_ids.shape[1]
            ],
        )
        for i, b in enumerate(out["before"])
    )
    if not same:
        raise AssertionError("batch-at-a-time and continuous batching sampled different responses")
    tokens = int(lengths.sum())
    print(
        f"continuous batching, {len(lengths)} sequences on {slots} slots (mean length "
        f"{float(lengths.float().mean()):.1f} of up to 64, same responses): batch after batch "
        f"{before * 1e3:.0f} ms -> continuous {after * 1e3:.0f} ms ({before / after:.2f}x; "
        f"{tokens / before:,.0f} -> {tokens / after:,.0f} tokens/s); model forwards {calls_before} -> "
        f"{calls_after}"
    )
    return {"sequences": len(lengths), "slots": slots, "prompts_per_call_before": per_call,
            "mean_length": float(lengths.float().mean()), "tokens": tokens, "before_ms": before * 1e3,
            "after_ms": after * 1e3, "speedup": before / after, "forwards_before": calls_before,
            "forwards_after": calls_after, "same_responses": same}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    import torch

    from flowrl.policy import token_logprobs
    from flowrl.rollout.hf import inverse_cdf_sample

    env = _common.environment()
    device = torch.device(args.device)
    torch.manual_seed(0)
    results: dict[str, Any] = {"sampling": [], "logprobs_with_entropy": []}

    for batch, vocab in [(32, 4096), (32, 151936), (512, 151936)]:
        logits = torch.randn(batch, vocab, device=device)
        before = median_time(lambda: torch.multinomial(torch.softmax(logits, -1), 1), args.repeats)  # noqa: B023
        after = median_time(lambda: inverse_cdf_sample(logits), args.repeats)  # noqa: B023
        results["sampling"].append(
            {"batch": batch, "vocab": vocab, "before_ms": before * 1e3, "after_ms": after * 1e3,
             "speedup": before / after}
        )  # fmt: skip
        timing = f"{before * 1e3:.2f} -> {after * 1e3:.2f} ms ({before / after:.1f}x)"
        print(f"sampling B={batch} V={vocab}: {timing}")

    for tokens, hidden_size, vocab in [(2048, 128, 4096), (1024, 896, 151936)]:
        lm_head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device)
        hidden = torch.randn(tokens, hidden_size, device=device)
        targets = torch.randint(0, vocab, (tokens,), device=device)
        for grad in (False, True):
            h = hidden.clone().requires_grad_(grad)

            def timed(
                variant: str, h: Any = h, grad: bool = grad, y: Any = targets, head: Any = lm_head
            ) -> float:
                def once() -> None:
                    with torch.set_grad_enabled(grad):
                        if variant == "two_projections":
                            lp, _ = previous_token_logprobs(h, y, head, 1024)
                        else:
                            lp, _ = token_logprobs(
                                h, y, head, temperature=1.0, chunk_size=1024, with_entropy=True,
                                fused=variant == "fused",
                            )  # fmt: skip
                        if grad:
                            lp.sum().backward()

                return median_time(once, args.repeats)

            ms = {variant: timed(variant) * 1e3 for variant in LOGPROB_VARIANTS}
            label = "forward+backward" if grad else "no grad"
            results["logprobs_with_entropy"].append(
                {"tokens": tokens, "hidden": hidden_size, "vocab": vocab, "pass": label,
                 **{f"{v}_ms": t for v, t in ms.items()},
                 "speedup_fused_vs_two_projections": ms["two_projections"] / ms["fused"],
                 "speedup_fused_vs_autograd": ms["autograd"] / ms["fused"]}
            )  # fmt: skip
            print(
                f"log-probs + entropy, {label}, {tokens} tokens, H={hidden_size}, V={vocab}: "
                + " -> ".join(f"{v} {t:.1f} ms" for v, t in ms.items())
                + f" (fused vs autograd {ms['autograd'] / ms['fused']:.2f}x)"
            )
    results["decoding"] = decoding(args.repeats, device)
    results["continuous_batching"] = continuous_batching(args.repeats, device)
    results["micro_batch_padding"] = micro_batch_padding()
    _common.print_load(env)
    _common.finish(env, {"benchmark": "fast_paths", "device": args.device, **results}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
