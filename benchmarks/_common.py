"""Shared pieces of the benchmark scripts: the environment record, models from config, child processes.

Every benchmark writes one JSON file holding :func:`environment` (machine, CPU count, load average at
start and end, versions, date, the command) next to its figures, so a number can always be traced to
the run, the machine and how busy it was. Models are Qwen2 configs with random weights (no download);
the tokenizer is the demo's character tokenizer (:func:`flowrl.data.synthetic.build_tokenizer`) padded
with filler tokens up to the model's vocabulary, so the demo's prompts and reward work at any vocab size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Qwen2.5 shapes (the configs on the Hub: Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B); "tiny" and "small" are
# CPU-sized. Every one has tied input and output embeddings, as the two Qwen2.5 models do.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512,
    ),
    "small": dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    ),
}  # fmt: skip


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other people's jobs share this machine)."""
    return [round(x, 2) for x in os.getloadavg()]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, CPU count, load average, versions, UTC date and the command line of this run."""
    import torch

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.is_absolute() and REPO in script.parents:
        script = script.relative_to(REPO)
    env: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", str(script), *argv[1:]]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "trl": _version("trl"),
            "accelerate": _version("accelerate"),
            "flowrl": _version("flowrl"),
            "flowrl_commit": _git_commit(),
        },
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_load(env: dict[str, Any]) -> None:
    """The load average now, with the reminder that other people's jobs share the machine."""
    print(f"load average {load_average()} on {env['cpu_count']} CPUs (shared machine: timings are noisy)")


def finish(env: dict[str, Any], results: dict[str, Any], path: str | Path | None) -> dict[str, Any]:
    """Add the end-of-run load average and write ``{environment, results}`` to ``path``."""
    report = {"environment": {**env, "load_average_end": load_average()}, **results}
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return report


def build_tokenizer(vocab_size: int) -> Any:
    """The demo's character tokenizer plus filler tokens ``<w{i}>``, ``vocab_size`` entries in all.

    The demo's prompts and answers encode exactly as with :func:`flowrl.data.synthetic.build_tokenizer`
    (fillers are never produced by encoding, only sampled by a random model and decoded).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from flowrl.data import synthetic

    base = synthetic.build_tokenizer().get_vocab()
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be >= {len(base)} (the demo's tokens), got {vocab_size}")
    vocab = dict(base)
    for i in range(vocab_size - len(base)):
        vocab[f"<w{i}>"] = len(base) + i
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(shape: str, tokenizer: Any, *, seed: int = 0, max_positions: int = 4096) -> Any:
    """A Qwen2 causal LM of ``MODEL_SHAPES[shape]`` with random weights (float32)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **MODEL_SHAPES[shape],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    if config.vocab_size != len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, model shape {shape!r} {config.vocab_size}")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def save_model(directory: str | Path, shape: str, *, seed: int = 0) -> Path:
    """Save a random ``shape`` model and its tokenizer to ``directory``; reuse it when already there."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tokenizer = build_tokenizer(MODEL_SHAPES[shape]["vocab_size"])
    model = build_model(shape, tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def parameter_count(model: Any) -> int:
    """Parameters, tied embeddings counted once (they are one matrix, used twice)."""
    return sum(p.numel() for p in model.parameters())


def prompt_rows(num_prompts: int) -> list[dict[str, Any]]:
    """``num_prompts`` digit-sum prompts in verl's schema (the demo's sums, cycled)."""
    from flowrl.data import synthetic

    sums = tuple(synthetic.SUMS[i % len(synthetic.SUMS)] for i in range(num_prompts))
    return synthetic.rows(sums)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, mean, min and max of the measured (steady-state) values."""
    if not values:
        return {}
    return {
        "median": round(statistics.median(values), 4),
        "mean": round(statistics.fmean(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def run_child(
    script: Path,
    spec: dict[str, Any],
    workdir: Path,
    name: str,
    *,
    timeout: float,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run ``script --child SPEC.json`` in a fresh process; return the JSON it wrote.

    One process per measured configuration: peak memory is then that configuration's alone, and no
    state (allocator caches, compiled kernels, thread pools) carries over from the previous one.
    The child's output goes to ``workdir/<name>.log``. ``threads`` sets its intra-op threads
    (``OMP_NUM_THREADS``); None leaves torch's default (one per core).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_file.write_text(json.dumps({**spec, "result_file": str(out_file)}))
    log = workdir / f"{name}.log"
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, str(script), "--child", str(spec_file)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            timeout=timeout,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **thread_env(threads)},
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    result = json.loads(out_file.read_text())
    result["process_wall_s"] = round(time.perf_counter() - started, 2)
    return result


def add_run_arguments(parser: Any, presets: dict[str, Any], names: Sequence[str], *, what: str) -> None:
    """The command line shared by the trainer comparisons: ``--preset``, ``--device``, ``--{what}s`` (the
    contestants, from ``names``), ``--repeats``, ``--steps``, ``--warmup``, then the process arguments."""
    parser.add_argument("--preset", choices=sorted(presets), default="cpu")
    parser.add_argument("--device", default=None, help="default: cuda for --preset gpu, else cpu")
    parser.add_argument(f"--{what}s", default=",".join(names), help=f"comma-separated, from {list(names)}")
    parser.add_argument("--repeats", type=int, default=2, help=f"runs per {what}, in mirrored order")
    parser.add_argument("--steps", type=int, help="RL steps per run (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="leading steps left out (default: the preset's)")
    add_process_arguments(parser)


def resolve_run(
    parser: Any, args: Any, presets: dict[str, Any], names: Sequence[str], *, what: str
) -> tuple[dict[str, Any], str, list[str]]:
    """The preset's workload with ``--steps`` / ``--warmup`` applied, the device, and the chosen names."""
    workload = dict(presets[args.preset])
    workload["steps"] = args.steps or workload["steps"]
    workload["warmup"] = args.warmup if args.warmup is not None else workload["warmup"]
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    chosen = [n.strip() for n in getattr(args, f"{what}s").split(",") if n.strip()]
    unknown = set(chosen) - set(names)
    if unknown:
        parser.error(f"unknown {what}s {sorted(unknown)}; choose from {list(names)}")
    return workload, device, chosen


def mirrored(names: Sequence[str], repeats: int) -> list[str]:
    """``repeats`` passes over ``names``, every other one reversed (A B C, C B A, ...), so a change in the
    machine's load hits every contestant alike."""
    return [n for r in range(repeats) for n in (names if r % 2 == 0 else names[::-1])]


def add_process_arguments(parser: Any) -> None:
    """``--threads``, ``--json``, ``--workdir`` and the hidden ``--child`` of the trainer benchmarks."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per process (OMP_NUM_THREADS); default: torch's, one per core. 1 is steadier "
        "on a machine shared with other jobs (no OpenMP barriers waiting for a descheduled thread)",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--workdir", help="keep models, configs and logs here (default: a temporary dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment variables that give a child process ``threads`` intra-op threads (none: the default)."""
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def peak_memory(device: Any) -> dict[str, float]:
    """Peak host RSS of this process and, on CUDA, peak allocated device memory (MiB)."""
    import torch

    out = {"peak_rss_mib": peak_rss_mib()}
    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


# -- the project's trainer in a child process ------------------------------------------------------


PERF_KEYS = (
    "perf/rollout_time_s",
    "perf/score_and_logprob_time_s",
    "perf/update_time_s",
    "perf/step_time_s",
    "perf/tokens_per_s",
    "rollout/response_length",
)


def run_project_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["overrides"]`` with :class:`flowrl.trainer.Trainer`, generation forced to full length.

    Returns the per-step ``perf/`` metrics, the wall time of every loop iteration (from the end of one
    step's logging to the end of the next one's, so nothing the loop does is left out), parameter
    counts and peak memory. ``spec["warmup_steps"]`` leading steps are reported but not summarized.
    """
    import dataclasses

    import torch

    from flowrl.config import load_config
    from flowrl.trainer import Trainer

    cfg = load_config(None, spec["overrides"])
    rss_after_import = peak_rss_mib()
    trainer = Trainer(cfg, overwrite=True)  # a benchmark run always starts afresh
    # The fixed workload: every response is max_new_tokens long (HFRolloutEngine's ignore_eos).
    trainer.sampling = dataclasses.replace(trainer.sampling, ignore_eos=True)
    stamps: list[float] = []
    log = trainer.logger.log

    def timed_log(step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        log(step, metrics, **kwargs)

    trainer.logger.log = timed_log
    trainer._save = lambda: None  # the final checkpoint (weights + AdamW state) is not what we measure
    start = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        trainer.dp.close()
    walls = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    warmup = int(spec.get("warmup_steps", 1))
    rows = result.metrics
    per_step = {key: [r[key] for r in rows if key in r] for key in PERF_KEYS}
    per_step["step_wall_s"] = walls
    steady = {key: summarize(values[warmup:]) for key, values in per_step.items()}
    head = trainer.policy.log_z_head
    return {
        "torch_threads": torch.get_num_threads(),
        "algorithm": cfg.algorithm.name,
        "reference_model": trainer.ref_policy is not None,
        "policy_parameters": parameter_count(trainer.policy.model),
        "log_z_head_parameters": 0 if head is None else parameter_count(head),
        "device": str(trainer.device),
        "bf16": trainer.actor.bf16,
        "warmup_steps": warmup,
        "per_step": {k: [round(v, 4) for v in values] for k, values in per_step.items()},
        "steady_state": steady,
        "memory": {**peak_memory(trainer.device), "rss_after_import_mib": rss_after_import},
    }


def trainer_overrides(
    *,
    model_dir: Path,
    data_file: Path,
    output_dir: Path,
    algorithm: str,
    prompts: int,
    samples: int,
    max_new_tokens: int,
    micro_batch: int,
    steps: int,
    device: str,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Dotted overrides for one RL step = ``prompts x samples`` responses, one optimizer step, one
    ``generate`` call, no checkpoints, plots, TensorBoard or sample printing."""
    n = prompts * samples
    items = {
        "model.path": model_dir,
        "data.train_files": f"[{data_file}]",
        "data.max_prompt_length": 64,
        "rollout.num_samples_per_prompt": samples,
        "rollout.max_new_tokens": max_new_tokens,
        "rollout.batch_size": n,
        "algorithm.name": algorithm,
        "train.prompts_per_step": prompts,
        "train.mini_batch_size": n,
        "train.micro_batch_size": micro_batch,
        "train.total_steps": steps,
        "train.device": device,
        "train.save_every": 0,
        "train.keep_checkpoints": 1,
        "train.sample_every": 0,
        "train.progress": "false",
        "train.tensorboard": "false",
        "train.plot": "false",
        "train.output_dir": output_dir,
        "optim.lr": 1e-6,
        "optim.warmup_steps": 1,
        "reward.function": "flowrl.data.synthetic:reward",
        **(extra or {}),
    }
    return [f"{k}={v}" for k, v in items.items()]


def digit_sum_reward(
    prompts: list[Any], completions: list[Any], reward_model: list[Any], **_: Any
) -> list[float]:
    """The demo's reward as a TRL reward function (the ``reward_model`` column holds the ground truth)."""
    from flowrl.data import synthetic

    return [
        synthetic.reward(c if isinstance(c, str) else c[-1]["content"], {"reward_model": rm}).score
        for c, rm in zip(completions, reward_model, strict=True)
    ]


def trl_dataset(model_dir: str, prompts: int) -> tuple[Any, Any]:
    """The model's tokenizer and the digit-sum prompts as a TRL dataset (chat-templated prompt text and
    the ground truth)."""
    from datasets import Dataset

    from flowrl.policy import load_tokenizer, prompt_text

    tokenizer = load_tokenizer(model_dir)
    rows = prompt_rows(prompts)
    return tokenizer, Dataset.from_list(
        [{"prompt": prompt_text(tokenizer, r["prompt"]), "reward_model": r["reward_model"]} for r in rows]
    )


def trl_grpo_args(spec: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The GRPOConfig arguments every TRL row shares: the workload's batch, lengths (forced to full
    length), steps and device, one generation batch per optimizer step."""
    w = spec["workload"]
    cuda = spec["device"].startswith("cuda")
    return dict(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=w["micro_batch"],
        gradient_accumulation_steps=w["prompts"] * w["samples"] // w["micro_batch"],
        num_generations=w["samples"],
        max_completion_length=w["max_new_tokens"],
        generation_kwargs={"min_new_tokens": w["max_new_tokens"]},
        max_steps=w["steps"],
        learning_rate=1e-6,
        seed=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=cuda,  # the project's default: on for GPU, off on CPU
        model_init_kwargs={"dtype": dtype},
    )
