"""The embedded demo's experiment: the digit-sum task's tiny model, its exact metrics, table and figure.

``flowrl demo`` (:mod:`flowrl.commands.demo`) strings these together: :func:`prepare` builds, saves,
reloads and warms up the tiny model; :func:`demo_config` is the RL run of each method through the real
trainer; :func:`evaluate` and :func:`trajectory` measure a policy and every checkpoint of a run (sampled
accuracy and pass@k, and, because the answer set is enumerable, the exact mass on correct answers and
the exact KL from FlowRL's target, :func:`flowrl_target`); :func:`format_table` and :func:`plot` draw
the results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
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
from flowrl.toy import METHOD_COLORS, METHOD_LABELS

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


def well_formed_ids(tokenizer: Any) -> set[tuple[int, ...]]:
    """Token ids of every well-formed response, EOS included: the set :func:`answer_distribution` covers."""
    pairs = [("", synthetic.response_for(a)) for a in synthetic.candidate_answers()]
    return {tuple(response) for _, response in encode_pairs(tokenizer, pairs)}


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
    responses = [r[m.bool()] for r, m in zip(batch.response_ids, batch.response_mask, strict=True)]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    well_formed = well_formed_ids(tokenizer)
    ks = [1, 4, 16]
    out: dict[str, list[float]] = {
        "accuracy": [],
        "distinct_correct": [],
        "mass_correct": [],
        "kl_to_target": [],
        "modes_covered": [],
        "off_format": [],
        **{f"pass@{k}": [] for k in ks},
    }
    for i, example in enumerate(examples):
        total = int(example["reward_model"]["ground_truth"])
        group = texts[i * EVAL_SAMPLES : (i + 1) * EVAL_SAMPLES]
        correct = [safe_score(synthetic.reward, t, example).score > 0 for t in group]
        c = sum(correct)
        out["accuracy"].append(c / EVAL_SAMPLES)
        # rewarded, yet outside the set the exact rows are computed over (e.g. `` \boxed{72}}}}`` cut at
        # the token limit, no EOS): the sampled rows count these, the exact ones cannot
        ids = responses[i * EVAL_SAMPLES : (i + 1) * EVAL_SAMPLES]
        off = sum(ok and tuple(r.tolist()) not in well_formed for r, ok in zip(ids, correct, strict=True))
        out["off_format"].append(off / EVAL_SAMPLES)
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
    ("off_format", "correct, not well-formed (sampled share)"),
)
EXACT_SET_NOTE = (
    "exact: over the well-formed responses ' \\boxed{dd}<eos>'; a correct answer written otherwise is in "
    "the sampled rows only"
)
"""Printed under the table: the responses the exact rows are computed over (the last row counts the
correct ones outside them)."""


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    widths = [max(12, len(n) + 2) for n in names]
    header = f"{'metric':<42}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = [
        header,
        "-" * len(header),
        f"{'RL step':<42}"
        + "".join(f"{int(results[n]['step']):>{w}}" for n, w in zip(names, widths, strict=True)),
    ]
    for key, label in ROWS:
        lines.append(
            f"{label:<42}" + "".join(f"{results[n][key]:>{w}.3f}" for n, w in zip(names, widths, strict=True))
        )
    return "\n".join(lines)


REFERENCE = "sft (start)"
"""The name of the reference (SFT) policy's entry in the plot's inputs; FlowRL's target derives from it."""


def plot_colors(names: Iterable[str]) -> dict[str, str]:
    """The colour of each curve of the demo's plot, from the fixed map :data:`flowrl.toy.METHOD_COLORS`.

    ``"sft (start)"`` takes the reference's colour, ``"target"`` the target's, a matched checkpoint such
    as ``"grpo@225"`` its method's. A name outside the map is an error rather than a colour from
    matplotlib's cycle, which would depend on the order the curves are drawn in.
    """
    colors = {}
    for name in names:
        key = "reference" if name == REFERENCE else name.split("@")[0]
        if key not in METHOD_COLORS:
            raise KeyError(f"no plot colour for {name!r}; add it to flowrl.toy.METHOD_COLORS")
        colors[name] = METHOD_COLORS[key]
    return colors


def _label(name: str) -> str:
    return "SFT (start)" if name == REFERENCE else METHOD_LABELS.get(name, name)


def flowrl_target(reference: dict[str, float], total: int) -> dict[str, float]:
    """FlowRL's target over the answers of ``sum total:``: the reference restricted to correct answers.

    The target is p*(y|x) ∝ exp(beta |y| r_hat(x, y)) pi_ref(y|x) (|y| from the length-normalized loss).
    The reward is 0/1 and every well-formed answer has the same length, so all correct answers of a group
    get the same tilt, and p* keeps pi_ref's proportions among them at any beta; only its total mass on
    them depends on beta and on the group's accuracy (at the demo's beta = 0.3, 6-token responses and
    groups of 16 with both outcomes, a correct answer weighs at least e^3.49 ~ 33 times a wrong one). This
    is the large-beta limit, all mass on correct answers: the target of the demo's exact KL and coverage
    metrics.
    """
    good = synthetic.correct_answers(total)
    mass = sum(reference[a] for a in good)
    return {a: reference[a] / mass for a in good}


def figure(
    trajectories: dict[str, list[dict[str, float]]],
    dists: dict[str, dict[str, float]],
    total: int,
) -> tuple[Any, dict[str, str]]:
    """The demo's figure and the colour of each of its curves (one colour per method in both panels).

    Left: each correct answer's probability for the prompt ``sum total:`` under every policy of ``dists``
    (which must hold :data:`REFERENCE`), with FlowRL's target (:func:`flowrl_target`) drawn across each
    answer's bars. Right: accuracy against coverage at every checkpoint of each run in ``trajectories``
    (each point a dict with ``step``, ``accuracy`` and ``modes_covered``), and the target's own point.
    Every artist drawn for a policy or the target has its name as ``gid``. Returns ``(figure, colors)``;
    the caller closes the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = plot_colors([*dists, *trajectories, "target"])
    target = flowrl_target(dists[REFERENCE], total)
    good = sorted(target, key=target.__getitem__, reverse=True)  # the reference's (and target's) order
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6), width_ratios=(1.15, 1))

    # The axis is scaled to the target, so a policy's match to it can be read; a collapsed policy's bar
    # is cut at the top and labelled with its height.
    top = min(1.0, 2.2 * max(target.values()))
    width = 0.84 / len(dists)
    for j, (name, dist) in enumerate(dists.items()):
        mass = sum(dist[a] for a in good)
        xs, heights = [i - 0.42 + (j + 0.5) * width for i in range(len(good))], [dist[a] for a in good]
        label = f"{_label(name)}: {mass:.2f} on correct answers"
        left.bar(xs, heights, width, color=colors[name], label=label, gid=name)
        for x, h in zip(xs, heights, strict=True):
            if h > top:
                left.text(
                    x, 0.98 * top, f"{h:.2f} ↑", rotation=90, ha="center", va="top", color="white", fontsize=8
                )
    left.hlines(
        [target[a] for a in good],
        [i - 0.46 for i in range(len(good))],
        [i + 0.46 for i in range(len(good))],
        color=colors["target"],
        linewidth=2,
        label="FlowRL's target p*: SFT restricted to correct answers, renormalized",
        gid="target",
    )
    left.set_xticks(range(len(good)), good)
    left.set_xlim(-0.6, len(good) - 0.4)
    left.set_ylim(0, top)
    left.set_xlabel(f"correct answers of 'sum {total}:', most likely under SFT first")
    left.set_ylabel("probability of the answer")
    left.set_title(f"final policies, prompt 'sum {total}:'")
    # legends below the panels: inside, they could hide a bar, the target or a checkpoint
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)

    for name, points in trajectories.items():
        xs, ys = [p["accuracy"] for p in points], [p["modes_covered"] for p in points]
        right.plot(
            xs, ys, marker="o", markersize=4, color=colors[name], label=_label(name), zorder=2, gid=name
        )
        right.plot(
            xs[-1],
            ys[-1],
            "*",
            markersize=15,
            color=colors[name],
            markeredgecolor="white",
            zorder=3,
            gid=name,
        )
    firsts = [points[0] for points in trajectories.values() if points[0]["step"] == 0]
    if firsts:  # the runs start from the SFT model
        right.plot(
            firsts[0]["accuracy"],
            firsts[0]["modes_covered"],
            "o",
            markersize=9,
            color=colors[REFERENCE],
            label=_label(REFERENCE),
            zorder=4,
            gid=REFERENCE,
        )
    right.plot(
        1.0,
        1.0,
        "D",
        markersize=8,
        color=colors["target"],
        label="FlowRL's target p* (accuracy 1, all covered)",
        zorder=4,
        gid="target",
    )
    final = {int(points[-1]["step"]) for points in trajectories.values()}
    handles, labels = right.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", markersize=12, color="0.3", linestyle=""))
    labels.append(f"final checkpoint (step {'/'.join(map(str, sorted(final)))})")
    right.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False
    )
    right.set_xlim(right.get_xlim()[0], 1.03)
    right.set_ylim(-0.03, 1.06)
    right.set_xlabel("accuracy (avg@32, all prompts)")
    right.set_ylabel("correct answers covered (exact, share)")
    right.set_title("over training: every checkpoint, start to final")
    fig.text(
        0.5,
        0.01,
        "FlowRL's target p*(y|x) ∝ exp(β r̂) π_ref(y|x): with a 0/1 reward every correct answer gets the same "
        "r̂, so p* keeps the SFT model's proportions among them; drawn at large β (all mass on correct "
        "answers),\nthe target of the table's KL and coverage. A correct answer is covered when the policy "
        "keeps at least a quarter of its target probability.",
        ha="center",
        va="bottom",
        fontsize=8,
        color="0.25",
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig, colors


def plot(
    trajectories: dict[str, list[dict[str, float]]],
    dists: dict[str, dict[str, float]],
    total: int,
    path: Path,
) -> dict[str, str]:
    """Draw :func:`figure` to a PNG at ``path``; returns the colour of each curve."""
    import matplotlib.pyplot as plt

    fig, colors = figure(trajectories, dists, total)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return colors


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


RUNS: dict[str, tuple[str, str]] = {
    "flowrl": ("flowrl", "head"),
    "flowrl_group": ("flowrl", "group"),
    "grpo": ("grpo", "head"),
}
"""Each run the demo can make: its ``algorithm.name`` and ``log_z.mode`` (``flowrl_group``: no head)."""

LOG_Z_RUNS = {"head": ["flowrl"], "group": ["flowrl_group"], "both": ["flowrl", "flowrl_group"]}
"""The FlowRL runs of each ``--log-z`` choice."""


def demo_config(
    model_dir: Path,
    data: Path,
    run_dir: Path,
    algorithm: str,
    seed: int,
    steps: int,
    save_every: int,
    *,
    log_z_mode: str = "head",
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
            f"log_z.mode={log_z_mode}",
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
