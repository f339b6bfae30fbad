"""``flowrl demo``: FlowRL end to end on a fresh machine in minutes, with no downloads.

1. builds a character tokenizer and a tiny Qwen2-architecture model from code, saves them and loads them
   back through the loader used for real models (:func:`flowrl.policy.load_model`);
2. warms the model up with supervised fine-tuning on the digit-sum task (:mod:`flowrl.data.synthetic`),
   whose prompts each have several correct answers, so RL starts from a model right only part of the time;
3. trains with FlowRL through the real trainer (``flowrl.trainer``) and evaluates: accuracy (avg@n),
   pass@k, distinct correct answers per prompt from n samples, and, because the answer set is
   enumerable, the exact probability mass on correct answers and the exact KL from FlowRL's target
   p*(y|x) = pi_ref(y|x) 1[y correct] / Z(x) (the large-beta limit of exp(beta r_hat) pi_ref / Z);
4. with ``--compare``, runs GRPO with the same budget and seeds and prints both side by side, with a plot.

Every number printed is computed in the run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from flowrl import checkpoint as ckpt
from flowrl.config import Config, load_config
from flowrl.data import synthetic
from flowrl.data.schema import write_rows
from flowrl.evaluation.metrics import pass_at_k
from flowrl.policy import Policy, load_model, load_tokenizer
from flowrl.rewards.base import safe_score
from flowrl.rollout import HFRolloutEngine, SamplingParams
from flowrl.sft import batch_tensors, encode_pairs, sft

# The RL run of the demo, as dotted overrides of flowrl.config.Config (the resolved config is saved
# with each run as config.yaml, so `flowrl train <run>/config.yaml` repeats it).
DEMO_OVERRIDES = [
    "data.max_prompt_length=16",
    "rollout.num_samples_per_prompt=16",
    "rollout.max_new_tokens=8",
    "rollout.batch_size=160",
    "train.prompts_per_step=10",
    "train.mini_batch_size=160",
    "train.micro_batch_size=160",
    "train.log_every=25",
    "train.sample_every=200",
    "train.keep_checkpoints=100",
    "train.num_samples_to_show=2",
    "train.progress=false",
    "optim.lr=3e-4",
    "optim.weight_decay=0.0",
    "optim.warmup_steps=5",
    "log_z.lr=1e-2",
    "reward.function=flowrl.data.synthetic:reward",
]
DEMO_STEPS = 600
# FlowRL's beta for the demo. The target tilts by exp(beta * |y| * r_hat) per response (the loss is
# length-normalized): the paper's beta = 15 suits its long answers; on this task's 6-token answers
# a sweep of beta in {0.3, 1, 3, 15} (lr 3e-4, 150-600 steps, seeds 0 and 1) kept the most correct
# answers with beta = 0.3.
DEMO_BETA = 0.3
EVAL_SAMPLES = 32
PLOT_SUM = 9  # the prompt whose answer distribution the plot shows


@torch.no_grad()
def answer_distribution(model: Any, tokenizer: Any, total: int) -> dict[str, float]:
    """Exact probability of every well-formed response `` \\boxed{dd}<eos>`` for the prompt ``sum total:``."""
    answers = synthetic.candidate_answers()
    pairs = [(synthetic.prompt_for(total), synthetic.response_for(a)) for a in answers]
    ids, mask, prompt_length = batch_tensors(encode_pairs(tokenizer, pairs), tokenizer.pad_token_id, "cpu")
    model = model.to("cpu").eval()
    logprobs = Policy(model)(ids, mask, prompt_length).logprobs.sum(-1)
    return dict(zip(answers, logprobs.exp().tolist(), strict=True))


def evaluate(model: Any, tokenizer: Any, ref: dict[int, dict[str, float]], *, seed: int) -> dict[str, float]:
    """Sampled and exact metrics of ``model`` on every demo prompt (``ref``: the reference's answers)."""
    torch.manual_seed(seed)
    engine = HFRolloutEngine(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        batch_size=EVAL_SAMPLES * len(synthetic.SUMS),
        show_progress=False,
    )
    examples = synthetic.rows()
    prompts = [tokenizer(e["prompt"][0]["content"], add_special_tokens=False)["input_ids"] for e in examples]
    batch = engine.generate(prompts, SamplingParams(n=EVAL_SAMPLES, temperature=1.0, max_new_tokens=8))
    texts = tokenizer.batch_decode(
        [r[m.bool()] for r, m in zip(batch.response_ids, batch.response_mask, strict=True)],
        skip_special_tokens=True,
    )
    ks = [1, 4, 16]
    out: dict[str, list[float]] = {
        "accuracy": [],
        "distinct_correct": [],
        "mass_correct": [],
        "kl_to_target": [],
        "modes_covered": [],
        **{f"pass@{k}": [] for k in ks},
    }
    for i, example in enumerate(examples):
        total = int(example["reward_model"]["ground_truth"])
        group = texts[i * EVAL_SAMPLES : (i + 1) * EVAL_SAMPLES]
        correct = [safe_score(synthetic.reward, t, example).score > 0 for t in group]
        c = sum(correct)
        out["accuracy"].append(c / EVAL_SAMPLES)
        for k in ks:
            out[f"pass@{k}"].append(pass_at_k(EVAL_SAMPLES, c, k))
        out["distinct_correct"].append(
            len({synthetic.extract_answer(t) for t, ok in zip(group, correct, strict=True) if ok})
        )
        # exact: FlowRL's target is the reference restricted to correct answers
        good = synthetic.correct_answers(total)
        pi = answer_distribution(model, tokenizer, total)
        ref_mass = sum(ref[total][a] for a in good)
        target = {a: ref[total][a] / ref_mass for a in good}
        out["mass_correct"].append(sum(pi[a] for a in good))
        out["kl_to_target"].append(sum(p * math.log(p / max(pi[a], 1e-30)) for a, p in target.items()))
        # a correct answer counts as covered when the policy keeps a quarter of its target share
        out["modes_covered"].append(sum(pi[a] >= 0.25 * p for a, p in target.items()) / len(good))
    return {k: sum(v) / len(v) for k, v in out.items()}


ROWS = (
    ("accuracy", "accuracy (avg@32, sampled)"),
    ("pass@1", "pass@1"),
    ("pass@4", "pass@4"),
    ("pass@16", "pass@16"),
    ("distinct_correct", "distinct correct answers / prompt (of 32)"),
    ("modes_covered", "correct answers covered (exact, share)"),
    ("mass_correct", "mass on correct answers (exact)"),
    ("kl_to_target", "KL(target || policy) (exact)"),
)


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    header = f"{'metric':<42}" + "".join(f"{n:>12}" for n in names)
    lines = [
        header,
        "-" * len(header),
        f"{'RL step':<42}" + "".join(f"{int(results[n]['step']):>12}" for n in names),
    ]
    for key, label in ROWS:
        lines.append(f"{label:<42}" + "".join(f"{results[n][key]:>12.3f}" for n in names))
    return "\n".join(lines)


def plot(
    trajectories: dict[str, list[dict[str, float]]],
    dists: dict[str, dict[str, float]],
    total: int,
    path: Path,
) -> None:
    """Left: each correct answer's probability for one prompt; right: accuracy against coverage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = synthetic.correct_answers(total)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(dists)
    for j, (name, dist) in enumerate(dists.items()):
        axes[0].bar([i + j * width for i in range(len(good))], [dist[a] for a in good], width, label=name)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(good))], good)
    axes[0].set_title(f"probability of each correct answer, prompt 'sum {total}:'")
    axes[0].legend()
    for name, points in trajectories.items():
        xs, ys = [p["accuracy"] for p in points], [p["modes_covered"] for p in points]
        axes[1].plot(xs, ys, marker="o", label=name)
        axes[1].annotate(f"step {int(points[-1]['step'])}", (xs[-1], ys[-1]), fontsize=8)
    axes[1].set_xlabel("accuracy (avg@32)")
    axes[1].set_ylabel("correct answers covered (exact)")
    axes[1].set_title("over training, every checkpoint")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare(out: Path, *, seed: int, sft_steps: int) -> tuple[Path, Path]:
    """Build, save, reload and warm up the tiny model; write the prompts. Returns (model dir, data file)."""
    base = synthetic.save_tiny_model(out / "base_model", seed=seed)
    tokenizer = load_tokenizer(str(base))
    model = load_model(str(base))  # the same loader as for any Hugging Face model
    started = time.perf_counter()
    losses = sft(model, tokenizer, synthetic.warmup_pairs(4096, seed=seed), steps=sft_steps, seed=seed)
    print(
        f"sft warm-up: {sft_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"({time.perf_counter() - started:.1f}s)"
    )
    sft_dir = out / "sft_model"
    model.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    data = write_rows(synthetic.rows(), out / "data" / "train.jsonl")
    return sft_dir, data


def demo_config(
    model_dir: Path, data: Path, run_dir: Path, algorithm: str, seed: int, steps: int, save_every: int
) -> Config:
    return load_config(
        None,
        [
            *DEMO_OVERRIDES,
            f"model.path={model_dir}",
            f"data.train_files=[{data}]",
            f"train.output_dir={run_dir}",
            f"algorithm.name={algorithm}",
            f"train.seed={seed}",
            f"train.total_steps={steps}",
            f"train.save_every={save_every}",
            *([f"algorithm.loss.beta={DEMO_BETA}"] if algorithm == "flowrl" else []),
        ],
    )


def trajectory(
    run_dir: Path, tokenizer: Any, ref: dict[int, dict[str, float]], *, seed: int
) -> list[dict[str, float]]:
    """Metrics of every checkpoint the run saved, in step order (each entry has its ``step``)."""
    points = []
    for path in ckpt.list_checkpoints(run_dir / ckpt.CHECKPOINTS_DIR):
        model = load_model(str(path / ckpt.MODEL_DIR))
        step = int(path.name.split("_")[-1])
        points.append({"step": step, **evaluate(model, tokenizer, ref, seed=seed)})
    return points


def closest(points: list[dict[str, float]], accuracy: float) -> dict[str, float]:
    """The point of a trajectory whose accuracy is closest to ``accuracy``."""
    return min(points, key=lambda p: abs(p["accuracy"] - accuracy))


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``flowrl demo``, built without running anything."""
    parser = argparse.ArgumentParser(prog="flowrl demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--compare", action="store_true", help="also train GRPO with the same budget and seeds"
    )
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="RL steps per method")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="checkpoint and evaluate every k steps (0: steps / 8)"
    )
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--json", help="write every number to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from flowrl.trainer import train

    started = time.perf_counter()
    # One thread: the model is tiny, and with other load on a 2-core machine a second thread made SFT
    # steps 45x slower (1.3 s instead of 30 ms per step, measured).
    torch.set_num_threads(1)
    out = Path(args.output_dir)
    eval_every = args.eval_every or max(1, args.steps // 8)
    sft_dir, data = prepare(out, seed=args.seed, sft_steps=args.sft_steps)
    tokenizer = load_tokenizer(str(sft_dir))
    ref_model = load_model(str(sft_dir))
    ref = {s: answer_distribution(ref_model, tokenizer, s) for s in synthetic.SUMS}
    start = {"step": 0, **evaluate(ref_model, tokenizer, ref, seed=args.seed)}
    results = {"sft (start)": start}
    trajectories: dict[str, list[dict[str, float]]] = {}
    dists = {"sft (start)": ref[PLOT_SUM]}
    for algorithm in ["flowrl", "grpo"] if args.compare else ["flowrl"]:
        print(f"\n== {algorithm}: {args.steps} RL steps ==")
        run_dir = out / algorithm
        cfg = demo_config(sft_dir, data, run_dir, algorithm, args.seed, args.steps, eval_every)
        run = train(cfg)
        trajectories[algorithm] = [start, *trajectory(run_dir, tokenizer, ref, seed=args.seed)]
        results[algorithm] = trajectories[algorithm][-1]
        dists[algorithm] = answer_distribution(run.policy.model, tokenizer, PLOT_SUM)
    if args.compare:
        # GRPO climbs faster; compare coverage where the two are equally accurate as well
        matched = closest(trajectories["grpo"], results["flowrl"]["accuracy"])
        results[f"grpo@{int(matched['step'])}"] = matched
    elapsed = time.perf_counter() - started
    print(
        f"\nflowrl demo: digit-sum task, {len(synthetic.SUMS)} prompts, {EVAL_SAMPLES} samples each, "
        f"{args.steps} RL steps per method (wall time {elapsed:.0f}s)\n"
    )
    print(format_table(results))
    if args.compare:
        print(
            f"grpo@{int(matched['step'])}: the GRPO checkpoint closest to FlowRL's final accuracy "
            f"(checkpoints every {eval_every} steps)"
        )
    figure = out / "demo.png"
    plot(trajectories, dists, PLOT_SUM, figure)
    print(f"\nplot: {figure}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"results": results, "trajectories": trajectories, "wall_time_s": elapsed}, indent=2)
        )
    return 0
