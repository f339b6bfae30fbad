"""``flowrl demo``: FlowRL end to end on a fresh machine in minutes, with no downloads.

1. builds a character tokenizer and a tiny Qwen2-architecture model from code, saves them and loads them
   back through the loader used for real models (:func:`flowrl.policy.load_model`);
2. warms the model up with supervised fine-tuning on the digit-sum task (:mod:`flowrl.data.synthetic`),
   whose prompts each have several correct answers, so RL starts from a model right only part of the time;
3. trains with FlowRL through the real trainer (``flowrl.trainer``) and evaluates: accuracy (avg@n),
   pass@k, distinct correct answers per prompt from n samples, and, because the answer set is
   enumerable, the exact probability mass on correct answers and the exact KL from FlowRL's target
   p*(y|x) = pi_ref(y|x) 1[y correct] / Z(x) (the large-beta limit of exp(beta r_hat) pi_ref / Z);
4. with ``--compare``, runs GRPO with the same budget and seeds and prints both side by side, with a plot;
5. ``--log-z group`` runs FlowRL without a partition head (``log_z.mode=group``: each prompt's log Z is
   the group estimate from its 16 samples), ``--log-z both`` runs both modes (``flowrl`` and
   ``flowrl_group``).

Every number printed is computed in the run. The steps are :mod:`flowrl.demo`'s; this module parses the
flags, runs them in order and prints the results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowrl.data import synthetic
from flowrl.demo import (
    DEMO_STEPS,
    EVAL_SAMPLES,
    EXACT_SET_NOTE,
    LOG_Z_RUNS,
    PLOT_SUM,
    RUNS,
    answer_distribution,
    closest,
    demo_config,
    evaluate,
    format_table,
    plot,
    prepare,
    trajectory,
)
from flowrl.policy import load_model, load_tokenizer


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
    parser.add_argument(
        "--log-z",
        choices=list(LOG_Z_RUNS),
        default="head",
        help="FlowRL's log Z: a learned head (the paper's), the group estimate of each prompt's samples "
        "(no head; the run is named flowrl_group), or both runs",
    )
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
    flowrl_runs = LOG_Z_RUNS[args.log_z]
    for name in [*flowrl_runs, "grpo"] if args.compare else flowrl_runs:
        print(f"\n== {name}: {args.steps} RL steps ==")
        run_dir = out / name
        algorithm, mode = RUNS[name]
        cfg = demo_config(
            sft_dir, data, run_dir, algorithm, args.seed, args.steps, eval_every, log_z_mode=mode
        )
        run = train(cfg, overwrite=True)  # the demo always starts afresh
        trajectories[name] = [start, *trajectory(run_dir, tokenizer, ref, seed=args.seed)]
        results[name] = trajectories[name][-1]
        dists[name] = answer_distribution(run.policy.model, tokenizer, PLOT_SUM)
    if args.compare:
        # GRPO climbs faster; compare coverage where the two are equally accurate as well
        matched = closest(trajectories["grpo"], results[flowrl_runs[0]]["accuracy"])
        results[f"grpo@{int(matched['step'])}"] = matched
    elapsed = time.perf_counter() - started
    print(
        f"\nflowrl demo: digit-sum task, {len(synthetic.SUMS)} prompts, {EVAL_SAMPLES} samples each, "
        f"{args.steps} RL steps per method (wall time {elapsed:.0f}s)\n"
    )
    print(format_table(results))
    print(EXACT_SET_NOTE)
    if args.compare:
        print(
            f"grpo@{int(matched['step'])}: the GRPO checkpoint closest to {flowrl_runs[0]}'s final accuracy "
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
