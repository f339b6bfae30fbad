"""The embedded demo's task: a tiny tokenizer and model built from code, and prompts with many answers.

Task "digit sum": the prompt ``sum 7:`` asks for a two-digit number whose digits add up to 7; the answer
is written as math answers are, ``\\boxed{34}``. Every prompt has several correct answers (16, 25, 34,
43, 52, 61, 70 for 7), all of them enumerable, so the policy's exact distribution over answers, and its
distance to FlowRL's target, can be computed rather than estimated.

The warm-up data is deliberately uneven: correct answers with Zipf-like frequencies (one dominant
answer per prompt) and a share of near misses (digit sum off by one), so RL starts from a model that
is right only part of the time and already prefers one mode. A reward maximizer sharpens onto that
mode; FlowRL's target keeps every correct answer in proportion to the reference policy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowrl.rewards.base import RewardResult, RewardStatus

DATA_SOURCE = "synthetic_digit_sum"
SUMS = tuple(range(4, 14))  # 4..9 correct answers each
BOXED = "\\boxed{"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
_CHARS = "0123456789}sum: "
_ANSWER = re.compile(r"\\boxed\{(\d+)\}")


def prompt_for(total: int) -> str:
    return f"sum {total}:"


def correct_answers(total: int) -> list[str]:
    """Two-digit numbers (10..99) whose digits add up to ``total``."""
    return [str(v) for v in range(10, 100) if sum(map(int, str(v))) == total]


def candidate_answers() -> list[str]:
    """Every well-formed answer: the set the exact distribution is computed over."""
    return [str(v) for v in range(10, 100)]


def response_for(answer: str) -> str:
    return f" {BOXED}{answer}}}"


def extract_answer(response: str) -> str | None:
    found = _ANSWER.findall(response)
    return found[-1] if found else None


def reward(response: str, example: Mapping[str, Any]) -> RewardResult:
    """1 when the last ``\\boxed{}`` holds a two-digit number with the prompt's digit sum, else 0."""
    answer = extract_answer(response)
    if answer is None:
        return RewardResult(0.0, RewardStatus.NO_ANSWER)
    total = int(example["reward_model"]["ground_truth"])
    ok = answer in correct_answers(total)
    return RewardResult(1.0 if ok else 0.0, RewardStatus.CORRECT if ok else RewardStatus.WRONG)


def rows(sums: tuple[int, ...] = SUMS) -> list[dict[str, Any]]:
    """The prompts in verl's schema."""
    return [
        {
            "prompt": [{"role": "user", "content": prompt_for(s)}],
            "data_source": DATA_SOURCE,
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(s)},
            "extra_info": {"index": i, "num_correct": len(correct_answers(s))},
        }
        for i, s in enumerate(sums)
    ]


def warmup_pairs(
    num: int, *, seed: int, wrong_fraction: float = 0.35, zipf: float = 1.2, sums: tuple[int, ...] = SUMS
) -> list[tuple[str, str]]:
    """(prompt, response) pairs for the supervised warm-up, drawn from the uneven distribution above."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(num):
        s = rng.choice(sums)
        if rng.random() < wrong_fraction:
            answer = rng.choice(correct_answers(s + rng.choice((-1, 1))))
        else:
            answers = correct_answers(s)
            random.Random(s).shuffle(answers)  # a fixed dominant answer per prompt
            weights = [1.0 / (rank + 1) ** zipf for rank in range(len(answers))]
            answer = rng.choices(answers, weights)[0]
        pairs.append((prompt_for(s), response_for(answer)))
    return pairs


def build_tokenizer() -> Any:
    """A character-level tokenizer (plus one ``\\boxed{`` token) as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, BOXED, *_CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_model(
    tokenizer: Any, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
) -> Any:
    """A randomly initialised Qwen2-architecture causal LM sized for a laptop CPU."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def save_tiny_model(directory: str | Path, *, seed: int = 0, **model_kwargs: Any) -> Path:
    """Build the tokenizer and a tiny random model and save both to ``directory`` (no network)."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
