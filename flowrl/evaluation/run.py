"""The evaluation runner: sample n responses per problem, score them, report avg@n, pass@k, maj@n, diversity.

:func:`run_eval` does the work of ``flowrl eval`` (the command, :mod:`flowrl.commands.eval`, turns its
flags into an :class:`EvalConfig`, prints the table and sets the exit status)::

    flowrl eval --model runs/flowrl --model base=Qwen/Qwen2.5-7B \\
        --data data/aime24.parquet data/math500.parquet --output-dir outputs/eval

Defaults are the paper's evaluation protocol (arXiv 2509.15207, docs/algorithm.md#6-evaluation): 16
samples per problem, temperature 0.6, top_p 0.95, up to 8192 response tokens. Each data file (verl's
schema) is one benchmark, named by its ``data_source`` (or the file's stem when files share one).

Three phases, each its own function and each leaving files the next one starts from:

1. generate (:func:`generate_benchmark`): n samples per problem with the project's rollout engine,
   appended to ``generations/<model>/<benchmark>.jsonl`` (one line per problem) after every batch. A
   rerun skips the problems already there, so an interrupted eval continues where it stopped; the
   sampling settings are saved beside them (``settings.json``) and a rerun with other settings is
   refused rather than mixed in. Every problem's samples are seeded from ``--seed`` and its index (the
   engine keeps a random stream per sequence), so a resumed run, or one with another ``--batch-size``,
   draws the same samples as an uninterrupted one.
2. score (:func:`score_benchmark`): the reward registry (by ``data_source``) or ``--reward``, written to
   ``scores/<model>/<benchmark>.jsonl``, also resumable. ``--rescore`` redoes this phase and the
   report from the saved generations without loading any model.
3. report (:func:`summarize_benchmark`, :mod:`flowrl.evaluation.report`): ``results.json`` (every
   number), ``report.md`` and ``pass_at_k.png`` (one curve per model); ``flowrl eval`` prints the table.

Decisions (the metrics themselves are defined in :mod:`flowrl.evaluation.metrics`):

* correct means reward status ``correct``. An answer whose check timed out is scored wrong (status
  ``timeout``, counted). A reward that could not be computed (status ``error``: the machinery failed)
  counts as not correct in avg@n, pass@k and maj@n, which need every sample; such rewards are counted
  per status (``reward/status_*``, ``reward/failed``) in every table and file, and a warning names the
  most common reasons.
* final answers (maj@n, distinct answers) are :func:`flowrl.rewards.math.extract_answer`'s (the last
  ``\\boxed{}`` or ``Answer:`` line, presentation stripped), compared as strings. Code benchmarks have no
  final answer: maj@n and the answer counts are left out for them.
* distinct-n and self-BLEU use the whitespace-separated words of the decoded responses, so models with
  different tokenizers compare.
* token entropy is computed, not estimated from the sampled tokens' log-probs: after each batch one
  forward pass over prompt + response gives the entropy of the temperature-scaled next-token
  distribution (before top-p truncation) at every response token; it is averaged over the response's
  tokens, then over samples and problems. ``--no-entropy`` skips that pass.
* the mean over benchmarks weights every benchmark equally (the paper's headline); its standard error
  is sqrt(sum_b se_b^2) / B (benchmarks independent).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowrl.evaluation.metrics import default_ks, diversity_summary, macro_average, summarize_correctness

PAPER_NUM_SAMPLES = 16  # docs/algorithm.md#6-evaluation: 16 samples per problem
PAPER_TEMPERATURE = 0.6
PAPER_TOP_P = 0.95
PAPER_MAX_NEW_TOKENS = 8192
SCORE_CHUNK_PROBLEMS = 32  # problems scored (and appended to the scores file) at a time
DETAIL_CHARS = 200  # reward detail kept per failed sample
SETTINGS_FILE = "settings.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOT_FILE = "pass_at_k.png"
ENTROPY_NOTE = (
    "computed: entropy of the temperature-scaled next-token distribution (before top-p truncation) at "
    "each response token, from a forward pass over the generated tokens; mean over tokens, then samples"
)
# Sampling settings that must match for saved generations to be continued.
RESUME_KEYS = ("model", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "entropy")


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class EvalConfig:
    """The settings of one ``flowrl eval`` run (its command-line flags), validated on construction."""

    models: list[str] = field(default_factory=list)  # model dirs, hub ids, run or checkpoint dirs; NAME=PATH
    data: list[str] = field(default_factory=list)  # one parquet/jsonl file (verl's schema) per benchmark
    output_dir: str = "outputs/eval"
    n: int = PAPER_NUM_SAMPLES  # samples per problem
    temperature: float = PAPER_TEMPERATURE  # 0 = greedy (then n must be 1)
    top_p: float = PAPER_TOP_P
    top_k: int = 0  # 0 disables top-k (the paper samples without it)
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS  # response tokens per sample
    batch_size: int = 64  # sequences per generate call (problems x n); bounds generation memory
    seed: int = 0
    reward: str | None = None  # "module:function" for every row; None: the registry, by data_source
    num_workers: int = 2  # processes for math checks / concurrent code sandboxes
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1" ...
    dtype: str = "auto"  # weights' dtype: "auto" (as saved), "float32", "bfloat16", "float16"
    limit: int | None = None  # evaluate only the first N problems of each file (quick looks)
    rescore: bool = False  # score and report the saved generations again; load no model
    entropy: bool = True  # compute token entropies (one extra forward pass per batch)

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("give at least one --data file (parquet/jsonl in verl's schema)")
        if not self.models and not self.rescore:
            raise ValueError("give at least one --model (a model dir, hub id, or training run/checkpoint)")
        if self.n < 1:
            raise ValueError(f"--n (samples per problem) must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("--temperature 0 is greedy decoding: every sample would be the same; use --n 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max-new-tokens and --batch-size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


# ---------------------------------------------------------------------------------------------
# Models and benchmarks


@dataclass
class ModelSpec:
    """A model to evaluate: its label (directory and table name), as given, and what gets loaded."""

    label: str
    source: str  # the --model argument
    path: str  # a Hugging Face model directory or hub id
    checkpoint: str | None = None  # the training checkpoint it came from


def safe_name(text: str) -> str:
    """A file-name-safe label: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def _split_label(spec: str) -> tuple[str | None, str]:
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, path
    return None, spec


def resolve_model(spec: str) -> ModelSpec:
    """Turn a ``--model`` argument into what to load.

    ``NAME=PATH`` names the model; otherwise the label comes from the path. A training run directory
    (or its ``checkpoints/`` folder) resolves to its newest complete checkpoint's ``model/``; a
    checkpoint directory to its ``model/``; a directory with ``config.json`` is loaded as it is; a
    string that is not a local path is a hub id.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: an incomplete checkpoint, a run without one, or a directory that is no model.
    """
    from flowrl.checkpoint import (
        ADAPTER_DIR,
        MODEL_DIR,
        is_checkpoint_dir,
        is_training_output,
        model_dir_of,
        resolve_checkpoint,
    )
    from flowrl.policy import ADAPTER_CONFIG

    label, path = _split_label(spec)
    local = Path(path).expanduser()
    checkpoint = None
    if local.exists():
        if is_training_output(local):
            ckpt = resolve_checkpoint(local)
            checkpoint, model_path = str(ckpt.resolve()), model_dir_of(ckpt)  # LoRA runs: adapter/
            auto = f"{ckpt.resolve().parent.parent.name}-{ckpt.name}"
        elif (local / "config.json").is_file() or (local / ADAPTER_CONFIG).is_file():
            model_path = local
            full = local.resolve()
            in_checkpoint = full.name in (MODEL_DIR, ADAPTER_DIR) and is_checkpoint_dir(full.parent)
            auto = f"{full.parent.parent.parent.name}-{full.parent.name}" if in_checkpoint else full.name
        else:
            raise ValueError(
                f"--model {path}: not a model directory (no config.json), training run or checkpoint"
            )
        resolved = str(model_path.resolve())
    else:
        if path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise FileNotFoundError(
                f"--model {path}: no such directory; give a model directory, a training run directory, "
                "a checkpoint, or a hub id such as Qwen/Qwen2.5-7B"
            )
        resolved, auto = path, path.replace("/", "__")
    return ModelSpec(label=safe_name(label or auto), source=spec, path=resolved, checkpoint=checkpoint)


@dataclass
class Benchmark:
    """The problems of one data file."""

    name: str
    file: str
    rows: list[dict[str, Any]]
    has_final_answers: bool = True  # False for code: no maj@n, no answer counts

    @property
    def data_sources(self) -> list[str]:
        return sorted({str(r["data_source"]) for r in self.rows})


def load_benchmarks(files: Sequence[str], *, limit: int | None = None) -> list[Benchmark]:
    """Read each file (one benchmark each); the name is the file's ``data_source``, else its stem.

    Raises:
        FileNotFoundError, ValueError: a missing file, rows not in the schema, or an empty file.
    """
    from flowrl.data.schema import read_rows

    loaded = []
    for f in files:
        rows = read_rows(f)
        if not rows:
            raise ValueError(f"{f} holds no problems")
        loaded.append((f, rows[:limit] if limit else rows))
    candidates = []
    for _, rows in loaded:
        sources = {str(r["data_source"]) for r in rows}
        candidates.append(safe_name(sources.pop().rsplit("/", 1)[-1]) if len(sources) == 1 else None)
    names: list[str] = []
    for (f, _), candidate in zip(loaded, candidates, strict=True):
        name = candidate if candidate and candidates.count(candidate) == 1 else safe_name(Path(f).stem)
        while name in names:
            name += "_"
        names.append(name)
    return [Benchmark(name, str(f), rows) for name, (f, rows) in zip(names, loaded, strict=True)]


def check_rewards(benchmarks: Sequence[Benchmark], reward: str | None) -> Any:
    """Fail before generating when a benchmark has no reward; returns the ``--reward`` function or None.

    Also marks code benchmarks (routed to the code reward, or ``ability == "code"``) as having no final
    answers.
    """
    from flowrl.rewards import code as code_rewards
    from flowrl.rewards.base import load_callable
    from flowrl.rewards.registry import get_reward_fn

    reward_fn = load_callable(reward) if reward else None
    for bench in benchmarks:
        is_code = []
        for source in bench.data_sources:
            fn = reward_fn or get_reward_fn(source)  # raises naming how to register one
            is_code.append(fn is code_rewards.code_reward)
        is_code.append(all(r.get("ability") == "code" for r in bench.rows))
        bench.has_final_answers = not any(is_code)
    return reward_fn


def prompt_hash(row: Mapping[str, Any]) -> str:
    """Identifies a problem's prompt, to catch a data file that changed under saved generations."""
    return hashlib.sha1(json.dumps(row["prompt"], sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Incremental JSON Lines files


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file written batch by batch; a partial last line (from a kill in the
    middle of a write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        good += len(line)
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    return records


def append_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append records and make them durable before the next batch starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("".join(json.dumps(json_safe(r)) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def json_safe(value: Any) -> Any:
    """NaN and infinities become null, so every file is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# 1. Generation


def _pick_device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


class ModelSampler:
    """Loads a model on first use and samples ``n`` responses per problem with :class:`HFRolloutEngine`."""

    def __init__(self, model: ModelSpec, cfg: EvalConfig) -> None:
        self.spec, self.cfg = model, cfg
        self._parts: tuple[Any, Any, Any] | None = None  # tokenizer, engine, policy

    def _load(self) -> tuple[Any, Any, Any]:
        if self._parts is None:
            from flowrl.policy import Policy, load_model, load_tokenizer, verify_logprobs
            from flowrl.rollout import HFRolloutEngine

            device = _pick_device(self.cfg.device)
            print(f"loading {self.spec.path} on {device}", flush=True)
            try:
                tokenizer = load_tokenizer(self.spec.path)
                # transformers' choice of attention: sdpa where the model has it, else eager
                model = load_model(
                    self.spec.path, dtype=self.cfg.dtype, device=device, attn_implementation=None
                ).eval()
            except OSError as exc:  # transformers' "not found / cannot download"
                raise ValueError(
                    f"--model {self.spec.source}: cannot load {self.spec.path!r} ({exc}). A local directory "
                    "must exist (check the path); a hub id needs network access or the local HF cache"
                ) from exc
            engine = HFRolloutEngine(
                model,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                batch_size=self.cfg.batch_size,
                show_progress=False,
            )
            policy = Policy(model)
            verify_logprobs(policy)  # the entropy is the sampled distribution's
            self._parts = (tokenizer, engine, policy)
        return self._parts

    def sample(self, rows: Sequence[Mapping[str, Any]], *, seeds: Sequence[int]) -> list[dict[str, Any]]:
        """One record per row, with n of each: ``responses``, ``response_tokens``, ``truncated``,
        ``token_entropy``; ``seeds``, one per row, key its samples."""
        from flowrl.policy import encode_prompt
        from flowrl.rollout import SamplingParams

        tokenizer, engine, policy = self._load()
        cfg = self.cfg
        params = SamplingParams(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens,
        )
        batch = engine.generate([encode_prompt(tokenizer, r["prompt"]) for r in rows], params, seeds=seeds)
        texts = tokenizer.batch_decode(
            [ids[m.bool()] for ids, m in zip(batch.response_ids, batch.response_mask, strict=True)],
            skip_special_tokens=True,
        )
        entropies = self._token_entropy(policy, batch) if cfg.entropy else [None] * len(texts)
        lengths, truncated = batch.response_lengths.tolist(), batch.truncated.tolist()
        n = cfg.n
        return [
            {
                "responses": texts[j * n : (j + 1) * n],
                "response_tokens": lengths[j * n : (j + 1) * n],
                "truncated": truncated[j * n : (j + 1) * n],
                "token_entropy": entropies[j * n : (j + 1) * n] if cfg.entropy else None,
            }
            for j in range(len(rows))
        ]

    def _token_entropy(self, policy: Any, batch: Any) -> list[float]:
        """(N,) mean entropy over each response's tokens, from one forward pass (see module docstring)."""
        import torch

        temperature = self.cfg.temperature if self.cfg.temperature > 0 else 1.0
        with torch.no_grad():
            out = policy(
                batch.input_ids,
                batch.attention_mask,
                batch.prompt_ids.shape[1],
                temperature=temperature,
                with_entropy=True,
            )
        mask = batch.response_mask.float()
        return ((out.entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()

    def close(self) -> None:
        """Free the model (before the next one is loaded)."""
        if self._parts is not None:
            import torch

            self._parts = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _check_saved(records: Iterable[Mapping[str, Any]], bench: Benchmark, path: Path) -> None:
    for r in records:
        i = r["index"]
        if i < len(bench.rows) and r["prompt_hash"] != prompt_hash(bench.rows[i]):
            raise ValueError(
                f"{path} holds problem {i} with another prompt than {bench.file}: the data file changed "
                "since these were saved; choose a new --output-dir (or delete that file)"
            )


def generate_benchmark(
    sampler: ModelSampler, bench: Benchmark, path: Path, *, n: int, batch_size: int, seed: int
) -> tuple[list[dict[str, Any]], int]:
    """Sample every problem of ``bench`` not yet in ``path``, appending a line per problem per batch.

    Returns:
        ``(records of the benchmark's problems in order, number generated now)``.
    """
    from tqdm.auto import tqdm

    from flowrl.distributed import derive_seed

    done = {r["index"]: r for r in read_jsonl(path)}
    _check_saved(done.values(), bench, path)
    pending = [i for i in range(len(bench.rows)) if i not in done]
    per_call = max(1, batch_size // n)
    chunks = [pending[s : s + per_call] for s in range(0, len(pending), per_call)]
    for chunk in tqdm(chunks, desc=f"generate {bench.name}", leave=False, disable=not chunks):
        # Seeded per problem: a resumed run, or one in other batches, draws what an uninterrupted one would.
        seeds = [derive_seed(seed, "eval", i) for i in chunk]
        sampled = sampler.sample([bench.rows[i] for i in chunk], seeds=seeds)
        records = [
            {"index": i, "prompt_hash": prompt_hash(bench.rows[i]), **s}
            for i, s in zip(chunk, sampled, strict=True)
        ]
        append_jsonl(path, records)
        done.update((r["index"], r) for r in records)
    return [done[i] for i in range(len(bench.rows))], len(pending)


def check_settings(directory: Path, settings: Mapping[str, Any]) -> None:
    """Save the sampling settings with the generations, or refuse to continue ones made with others."""
    path = directory / SETTINGS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        diff = [
            f"{k}: {saved.get(k)!r} then, {settings[k]!r} now"
            for k in RESUME_KEYS
            if saved.get(k) != settings[k]
        ]
        if diff:
            raise ValueError(
                f"{directory} holds generations made with other settings ({'; '.join(diff)}); pass the same "
                "settings to continue them, or choose a new --output-dir"
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(settings), indent=2) + "\n")


def load_generations(path: Path, bench: Benchmark) -> list[dict[str, Any]]:
    """Saved generations of every problem of ``bench`` (for ``--rescore``).

    Raises:
        ValueError: some problems have none (finish generating first).
    """
    done = {r["index"]: r for r in read_jsonl(path)}
    _check_saved(done.values(), bench, path)
    missing = [i for i in range(len(bench.rows)) if i not in done]
    if missing:
        raise ValueError(
            f"{path} has generations for {len(bench.rows) - len(missing)} of {len(bench.rows)} problems; "
            "run without --rescore to finish generating them first"
        )
    return [done[i] for i in range(len(bench.rows))]


# ---------------------------------------------------------------------------------------------
# 2. Scoring


def final_answer(response: str) -> str | None:
    """The response's final answer as text (math extraction: last ``\\boxed{}`` or ``Answer:`` line)."""
    from flowrl.rewards.math import extract_answer

    found = extract_answer(response)
    return found.text if found is not None else None


def score_benchmark(
    bench: Benchmark,
    generations: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    reward_fn: Any,
    reward_name: str,
    num_workers: int,
) -> list[dict[str, Any]]:
    """Score the saved responses of ``bench`` not yet in ``path``; returns one record per problem.

    A record holds per sample ``scores`` (None where the reward failed), ``statuses``, ``details`` (the
    reason, for failed rewards) and ``answers`` (None for benchmarks without final answers).

    Raises:
        ValueError: ``path`` was scored with another reward (pass ``--rescore``).
    """
    from flowrl.rewards.registry import score_batch

    done = {r["index"]: r for r in read_jsonl(path)}
    other = sorted({r["reward"] for r in done.values()} - {reward_name})
    if other:
        raise ValueError(
            f"{path} was scored with reward {other[0]!r}, not {reward_name!r}; pass --rescore to score again"
        )
    pending = [g for g in generations if g["index"] not in done]
    for start in range(0, len(pending), SCORE_CHUNK_PROBLEMS):
        chunk = pending[start : start + SCORE_CHUNK_PROBLEMS]
        responses = [t for g in chunk for t in g["responses"]]
        examples = [bench.rows[g["index"]] for g in chunk for _ in g["responses"]]
        results = score_batch(responses, examples, reward_fn=reward_fn, num_workers=num_workers)
        records, pos = [], 0
        for g in chunk:
            mine = results[pos : pos + len(g["responses"])]
            pos += len(g["responses"])
            records.append(
                {
                    "index": g["index"],
                    "reward": reward_name,
                    "scores": [r.score for r in mine],
                    "statuses": [r.status.value for r in mine],
                    "details": [r.detail[:DETAIL_CHARS] if not r.ok else "" for r in mine],
                    "answers": [final_answer(t) for t in g["responses"]] if bench.has_final_answers else None,
                }
            )
        append_jsonl(path, records)
        done.update((r["index"], r) for r in records)
    return [done[g["index"]] for g in generations]


# ---------------------------------------------------------------------------------------------
# 3. Summaries


def summarize_benchmark(
    generations: Sequence[Mapping[str, Any]], scores: Sequence[Mapping[str, Any]], *, has_final_answers: bool
) -> dict[str, Any]:
    """Every number of one benchmark: correctness (with stderr), diversity, reward statuses, lengths.

    Returns:
        A flat dict: ``num_problems``, ``num_samples``, ``avg@n``, ``pass@k``, ``maj@n`` (each with
        ``_stderr``), ``diversity/<measure>`` (with ``_stderr``), ``reward/status_<status>`` counts,
        ``reward/failed``, ``reward/mean``, ``rollout/response_length``, ``rollout/truncation_rate``.
    """
    from flowrl.rewards.base import RewardStatus

    correct = [[s == RewardStatus.CORRECT.value for s in r["statuses"]] for r in scores]
    answers = [r["answers"] for r in scores] if has_final_answers else None
    n = len(correct[0])
    out = summarize_correctness(correct, default_ks(n), answers=answers)
    responses = [g["responses"] for g in generations]
    entropies = [g["token_entropy"] for g in generations]
    diversity = diversity_summary(
        responses,
        answers=answers,
        correct=correct if answers is not None else None,
        entropies=entropies if all(e is not None for e in entropies) else None,
    )
    out.update({f"diversity/{k}": v for k, v in diversity.items()})
    statuses = Counter(s for r in scores for s in r["statuses"])
    out.update({f"reward/status_{s.value}": statuses.get(s.value, 0) for s in RewardStatus})
    out["reward/failed"] = statuses.get(RewardStatus.ERROR.value, 0)  # a timeout is scored (wrong)
    finite = [s for r in scores for s in r["scores"] if s is not None and math.isfinite(s)]
    out["reward/mean"] = math.fsum(finite) / len(finite) if finite else math.nan
    lengths = [t for g in generations for t in g["response_tokens"]]
    out["rollout/response_length"] = math.fsum(lengths) / len(lengths)
    out["rollout/truncation_rate"] = sum(bool(t) for g in generations for t in g["truncated"]) / len(lengths)
    return out


def failure_reasons(scores: Sequence[Mapping[str, Any]], top: int = 3) -> list[tuple[str, int]]:
    """The most common reasons of failed rewards (status error; a timeout is scored, not failed)."""
    reasons = Counter(
        f"{status}: {detail}"
        for r in scores
        for status, detail in zip(r["statuses"], r["details"], strict=True)
        if status == "error"
    )
    return reasons.most_common(top)


def mean_over_benchmarks(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each metric averaged over benchmarks with equal weight; stderr sqrt(sum se^2) / B; counts summed."""
    first = next(iter(summaries.values()))
    out: dict[str, Any] = {}
    for key in first:
        if key.endswith("_stderr") or not all(key in s for s in summaries.values()):
            continue
        if key.startswith("reward/status_") or key in ("reward/failed", "num_problems"):
            out[key] = sum(s[key] for s in summaries.values())
            continue
        out[key] = macro_average(summaries, key)
        errors = [s.get(f"{key}_stderr") for s in summaries.values()]
        if all(e is not None for e in errors):
            out[f"{key}_stderr"] = math.sqrt(math.fsum(e * e for e in errors)) / len(errors)
    return out


# ---------------------------------------------------------------------------------------------
# The run


def _sampling_settings(model: ModelSpec, cfg: EvalConfig) -> dict[str, Any]:
    return {
        "model": model.path,
        "model_source": model.source,
        "checkpoint": model.checkpoint,
        "n": cfg.n,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "entropy": cfg.entropy,
    }


def _saved_models(generations_dir: Path) -> list[ModelSpec]:
    found = sorted(p for p in generations_dir.glob(f"*/{SETTINGS_FILE}")) if generations_dir.is_dir() else []
    if not found:
        raise ValueError(f"--rescore without --model: no saved generations under {generations_dir}")
    out = []
    for settings in found:
        saved = json.loads(settings.read_text())
        out.append(
            ModelSpec(settings.parent.name, saved["model_source"], saved["model"], saved["checkpoint"])
        )
    return out


def _console(label: str, bench: str, text: str) -> None:
    print(f"{label} | {bench} | {text}", flush=True)


def evaluate_model(
    model: ModelSpec, benchmarks: Sequence[Benchmark], cfg: EvalConfig, reward_fn: Any
) -> dict[str, Any]:
    """Generate (or load, with ``--rescore``), score and summarize one model on every benchmark."""
    out = Path(cfg.output_dir)
    gen_dir, score_dir = out / "generations" / model.label, out / "scores" / model.label
    if cfg.rescore:
        settings_path = gen_dir / SETTINGS_FILE
        if not settings_path.is_file():
            raise ValueError(
                f"--rescore: no saved generations for {model.label} in {gen_dir}; generate first"
            )
        settings = json.loads(settings_path.read_text())
    else:
        settings = _sampling_settings(model, cfg)
        check_settings(gen_dir, settings)
    reward_name = cfg.reward or "registry"
    sampler = ModelSampler(model, cfg)
    summaries: dict[str, dict[str, Any]] = {}
    failures: dict[str, list[tuple[str, int]]] = {}
    try:
        for bench in benchmarks:
            started = time.perf_counter()
            gen_path = gen_dir / f"{bench.name}.jsonl"
            if cfg.rescore:
                generations = load_generations(gen_path, bench)
                (score_dir / f"{bench.name}.jsonl").unlink(missing_ok=True)
            else:
                generations, new = generate_benchmark(
                    sampler, bench, gen_path, n=cfg.n, batch_size=cfg.batch_size, seed=cfg.seed
                )
                resumed = len(bench.rows) - new
                _console(
                    model.label,
                    bench.name,
                    f"generated {new} of {len(bench.rows)} problems"
                    + (f" ({resumed} already saved)" if resumed else "")
                    + f" | {time.perf_counter() - started:.1f}s",
                )
            scores = score_benchmark(
                bench,
                generations,
                score_dir / f"{bench.name}.jsonl",
                reward_fn=reward_fn,
                reward_name=reward_name,
                num_workers=cfg.num_workers,
            )
            summary = summarize_benchmark(generations, scores, has_final_answers=bench.has_final_answers)
            summaries[bench.name] = summary
            n = summary["num_samples"]
            _console(
                model.label,
                bench.name,
                f"avg@{n} {100 * summary[f'avg@{n}']:.2f} | pass@{n} {100 * summary[f'pass@{n}']:.2f} | "
                f"failed rewards {summary['reward/failed']}",
            )
            if summary["reward/failed"]:
                failures[bench.name] = failure_reasons(scores)
                listed = "; ".join(f"{c}x {d!r}" for d, c in failures[bench.name])
                print(
                    f"warning: {model.label} | {bench.name}: {summary['reward/failed']} of "
                    f"{summary['num_problems'] * n} rewards failed (counted as not correct): {listed}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        sampler.close()
    return {
        "model": model.source,
        "path": model.path,
        "checkpoint": model.checkpoint,
        "n": settings["n"],
        "settings": settings,
        "benchmarks": summaries,
        "mean": mean_over_benchmarks(summaries),
        "failed_reward_reasons": {b: [[d, c] for d, c in f] for b, f in failures.items()},
    }


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every model on every benchmark, write the report files, return ``results.json``'s content.

    Prints a line at the start and one per benchmark and model as it goes (the table is the caller's).
    """
    from flowrl.evaluation import report

    out = Path(cfg.output_dir)
    benchmarks = load_benchmarks(cfg.data, limit=cfg.limit)
    reward_fn = check_rewards(benchmarks, cfg.reward)
    models = [resolve_model(m) for m in cfg.models] if cfg.models else _saved_models(out / "generations")
    labels = [m.label for m in models]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"several --model arguments get the label(s) {repeated}; name them with NAME=PATH")
    out.mkdir(parents=True, exist_ok=True)
    sampling = (
        "rescoring saved generations"
        if cfg.rescore
        else f"n={cfg.n} temperature={cfg.temperature} top_p={cfg.top_p} top_k={cfg.top_k} "
        f"max_new_tokens={cfg.max_new_tokens} seed={cfg.seed}"
    )
    print(
        f"flowrl eval | models {', '.join(labels)} | benchmarks "
        f"{', '.join(f'{b.name} ({len(b.rows)})' for b in benchmarks)} | {sampling} | "
        f"reward {cfg.reward or 'by data_source'} | output {out}",
        flush=True,
    )
    # With --rescore the sampling settings are the saved ones, given per model (models.<label>.settings).
    skip = {"models", "data", "output_dir"} | (set(RESUME_KEYS) | {"batch_size"} if cfg.rescore else set())
    results: dict[str, Any] = {
        "settings": {
            **{k: v for k, v in asdict(cfg).items() if k not in skip},
            "token_entropy": ENTROPY_NOTE,
        },
        "benchmarks": {
            b.name: {"file": b.file, "num_problems": len(b.rows), "data_sources": b.data_sources}
            for b in benchmarks
        },
        "models": {},
    }
    for model in models:
        results["models"][model.label] = evaluate_model(model, benchmarks, cfg, reward_fn)
    results = json_safe(results)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    report.write_markdown(results, out / REPORT_FILE, plot_file=PLOT_FILE)
    report.plot_pass_at_k(results, out / PLOT_FILE)
    return results
