"""FlowRL's log Z from a learned head or from the group estimate, against GRPO: which to use when.

    .venv/bin/python benchmarks/log_z_ablation.py --preset cpu \\
        --json benchmarks/results/log_z_ablation.json --plot benchmarks/results/log_z_ablation.png

Three methods, the same seeds and budget for each:

* ``flowrl``: FlowRL with its partition head (``log_z.mode=head``, the paper's; in the toy a learned
  scalar log Z);
* ``flowrl_group``: FlowRL without a head (``log_z.mode=group``): each prompt's log Z is the
  importance-weighted mean over its samples of ``beta r_hat + ell_ref - ell``
  (:func:`flowrl.objectives.group_log_z`);
* ``grpo``: GRPO (the project's, ``kl_coef`` 0).

Two tasks:

* **the toy** (:mod:`flowrl.toy`, the paper's Figure 1): a categorical policy over 101 states towards a
  multi-modal target, on several targets, each method run at several step budgets (Adam has no
  schedule here, so a shorter budget is exactly the start of a longer run) and seeds. Figures, all
  exact: KL(target||policy), modes covered (a mode's window holds a quarter of its target mass) and the
  policy's mass inside the modes' windows (the toy's "accuracy": how often a sample lands on a mode);
  step time is the training loop's wall time per step on one thread.
* **the demo task** (:mod:`flowrl.demo`, digit sums with several correct answers per prompt): ``flowrl
  demo --compare --log-z both`` per seed, in its own process: a tiny Qwen2 warmed up with SFT, then RL
  through the project's trainer. Figures: the demo's exact KL(target||policy) (target: the SFT model
  restricted to correct answers), the exact share of correct answers covered, sampled accuracy
  (avg@32), distinct correct answers per prompt, and the trainer's own per-step times (medians after
  ``--warmup`` steps): step, rollout, rewards + log-prob passes, update.

And **step time on a fixed workload** (``benchmarks/flowrl_vs_grpo.py``'s CPU one: a 1.5M-parameter
Qwen2 with random weights, 8 prompts x 4 samples x 64 tokens forced to full length), each configuration
in its own process on one thread, ``repeats`` runs in mirrored order: the three methods with one
optimizer step per batch, where the group estimate needs one extra pass without gradient (the policy's
log-probs before the update), and FlowRL in both modes with 4 optimizer steps per batch
(mini-batches of a quarter of the batch), where that pass is made anyway (old log-probs).

Every number is computed in the run; the JSON holds every seed's figures and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

METHODS = ("flowrl", "flowrl_group", "grpo")
LABELS = {"flowrl": "FlowRL (head)", "flowrl_group": "FlowRL (group log Z)", "grpo": "GRPO"}

TARGETS: dict[str, dict[str, Any]] = {
    "default": dict(modes=(20, 50, 80), weights=(1.0, 2.0, 1.0), width=5.0),  # the paper's figure
    "skewed": dict(modes=(15, 45, 85), weights=(2.0, 1.0, 1.0), width=5.0),
    "four_modes": dict(modes=(10, 35, 60, 90), weights=(1.0, 2.0, 1.0, 3.0), width=4.0),
}

PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores: about 10 minutes, most of it the demo (about 90 s per method and seed).
    "cpu": dict(targets=list(TARGETS), budgets=(25, 50, 100, 200, 400, 1000), toy_seeds=(0, 1, 2),
                demo_steps=600, demo_seeds=(0, 1), sft_steps=400, eval_every=75, warmup=5),
    # The smoke test's: seconds of training.
    "smoke": dict(targets=["default"], budgets=(5, 10), toy_seeds=(0,),
                  demo_steps=2, demo_seeds=(0,), sft_steps=5, eval_every=1, warmup=0),
}  # fmt: skip

# configuration -> (algorithm.name, log_z.mode, optimizer steps per batch) of the fixed-workload timing
TIMING: dict[str, tuple[str, str, int]] = {
    "flowrl": ("flowrl", "head", 1),
    "flowrl_group": ("flowrl", "group", 1),
    "grpo": ("grpo", "head", 1),
    "flowrl/4": ("flowrl", "head", 4),
    "flowrl_group/4": ("flowrl", "group", 4),
}
TIMING_WORKLOADS: dict[str, dict[str, Any]] = {
    "cpu": dict(shape="small", prompts=8, samples=4, max_new_tokens=64, micro_batch=16, steps=8, warmup=2,
                repeats=3),
    "smoke": dict(shape="tiny", prompts=2, samples=2, max_new_tokens=4, micro_batch=4, steps=2, warmup=1,
                  repeats=1),
}  # fmt: skip

PERF_KEYS = {
    "perf/step_time_s": "step",
    "perf/rollout_time_s": "rollout",
    "perf/score_and_logprob_time_s": "rewards + log-prob passes",
    "perf/update_time_s": "update",
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def toy_run(method: str, target: str, steps: int, seed: int) -> dict[str, float]:
    """One toy run: exact figures of the final policy and the loop's seconds per step."""
    import torch

    from flowrl import toy

    spec = TARGETS[target]
    cfg = toy.ToyConfig(**spec, steps=steps, seed=seed, methods=(method,))
    target_log_p = toy.target_log_probs(cfg.modes, cfg.weights, cfg.width)
    started = time.perf_counter()
    policy_log_p, _ = toy.train_policy(method, target_log_p, cfg)
    seconds = time.perf_counter() - started
    policy, target_p = policy_log_p.exp(), target_log_p.exp()
    in_windows = torch.zeros_like(policy, dtype=torch.bool)
    for lo, hi in toy.mode_windows(cfg.modes, cfg.width):
        in_windows[lo : hi + 1] = True
    return {
        "kl_target_policy": toy.kl_divergence(target_log_p, policy_log_p),
        "modes_covered": toy.modes_covered(policy, target_p, cfg.modes, cfg.width) / len(cfg.modes),
        "in_mode_mass": float(policy[in_windows].sum()),
        "ms_per_step": 1000 * seconds / steps,
    }


def run_toy(preset: dict[str, Any]) -> dict[str, Any]:
    """Every method on every target, budget and seed; means over seeds per (target, method, budget)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy's own setting: tiny tensors, bit-identical runs
    try:
        runs: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
        for target in preset["targets"]:
            runs[target] = {m: {} for m in METHODS}
            for seed in preset["toy_seeds"]:
                for method in METHODS:  # interleaved, so a change in the machine's load hits all alike
                    for steps in preset["budgets"]:
                        row = toy_run(method, target, steps, seed)
                        runs[target][method].setdefault(str(steps), []).append(row)
            print(f"toy {target}: done (load {_common.load_average()[0]})", flush=True)
    finally:
        torch.set_num_threads(threads)
    means = {
        target: {
            method: {
                steps: {key: _mean([r[key] for r in rows]) for key in rows[0]}
                for steps, rows in by_steps.items()
            }
            for method, by_steps in by_method.items()
        }
        for target, by_method in runs.items()
    }
    return {"targets": {t: TARGETS[t] for t in preset["targets"]}, "mean_over_seeds": means, "runs": runs}


def _perf_medians(metrics_file: Path, warmup: int) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = rows[warmup:] or rows
    return {key: statistics.median(r[key] for r in rows) for key in PERF_KEYS}


def run_demo(preset: dict[str, Any], work: Path) -> dict[str, Any]:
    """``flowrl demo --compare --log-z both`` once per seed, each in a fresh process."""
    per_seed = {}
    for seed in preset["demo_seeds"]:
        out = work / f"demo-seed{seed}"
        command = [
            sys.executable, "-m", "flowrl.commands", "demo", "--compare", "--log-z", "both",
            "--seed", str(seed), "--steps", str(preset["demo_steps"]),
            "--sft-steps", str(preset["sft_steps"]), "--eval-every", str(preset["eval_every"]),
            "--output-dir", str(out), "--json", str(out / "demo.json"),
        ]  # fmt: skip
        print(f"demo seed {seed}: {' '.join(command[2:])} (load {_common.load_average()[0]})", flush=True)
        started = time.perf_counter()
        done = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=_common.REPO
        )
        if done.returncode != 0:
            raise RuntimeError(f"flowrl demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        wall = time.perf_counter() - started
        report = json.loads((out / "demo.json").read_text())
        per_seed[str(seed)] = {
            "wall_time_s": round(wall, 1),
            "final": {m: report["results"][m] for m in METHODS},
            "trajectories": {m: report["trajectories"][m] for m in METHODS},
            "perf_median_s": {m: _perf_medians(out / m / "metrics.jsonl", preset["warmup"]) for m in METHODS},
        }
        print(f"demo seed {seed}: {wall:.0f}s", flush=True)
    keys = ["kl_to_target", "modes_covered", "accuracy", "distinct_correct", "mass_correct", "pass@4"]
    seeds = list(per_seed.values())
    mean = {
        m: {
            **{k: _mean([s["final"][m][k] for s in seeds]) for k in keys},
            **{k: _mean([s["perf_median_s"][m][k] for s in seeds]) for k in PERF_KEYS},
        }
        for m in METHODS
    }
    spread = {
        m: {k: [min(s["final"][m][k] for s in seeds), max(s["final"][m][k] for s in seeds)] for k in keys}
        for m in METHODS
    }
    return {"mean_over_seeds": mean, "range_over_seeds": spread, "per_seed": per_seed}


def run_timing(workload: dict[str, Any], work: Path) -> dict[str, Any]:
    """Every :data:`TIMING` configuration on the fixed workload, one process per run, mirrored order."""
    from flowrl.data.schema import write_rows

    model_dir = _common.save_model(work / f"model-{workload['shape']}", workload["shape"])
    data_file = write_rows(_common.prompt_rows(workload["prompts"]), work / "prompts.jsonl")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in TIMING}
    for i, name in enumerate(_common.mirrored(list(TIMING), workload["repeats"])):
        algorithm, mode, optimizer_steps = TIMING[name]
        mini_batch = workload["prompts"] * workload["samples"] // optimizer_steps
        extra = {
            "log_z.mode": mode,
            "train.mini_batch_size": mini_batch,
            "train.micro_batch_size": min(workload["micro_batch"], mini_batch),
        }
        label = f"{i:02d}-{name.replace('/', '-')}"
        spec = {
            "warmup_steps": workload["warmup"],
            "overrides": _common.trainer_overrides(
                model_dir=model_dir, data_file=data_file, output_dir=work / "runs" / label,
                algorithm=algorithm, prompts=workload["prompts"], samples=workload["samples"],
                max_new_tokens=workload["max_new_tokens"], micro_batch=workload["micro_batch"],
                steps=workload["steps"], device="cpu", extra=extra,
            ),
        }  # fmt: skip
        print(f"timing {name} (load {_common.load_average()[0]})", flush=True)
        # one thread: on a shared 2-core machine two OpenMP threads stall at every barrier whenever the
        # hypervisor deschedules one (steps 10-30x slower, seen here); one is steady
        child = _common.run_child(Path(__file__), spec, work / "logs", label, timeout=1800, threads=1)
        runs[name].append(child)
    return {"workload": workload, "median_s": timing_summary(runs, workload["warmup"]), "runs": runs}


def timing_summary(runs: dict[str, list[dict[str, Any]]], warmup: int) -> dict[str, dict[str, float]]:
    """Per configuration and phase: each run's median over its steps after ``warmup``, then the least of
    those over the runs. On a machine shared with other jobs a burst of load slows whole runs (2x seen
    here), never speeds one up, so the least disturbed run is the estimate."""
    return {
        name: {key: min(statistics.median(run["per_step"][key][warmup:]) for run in rs) for key in PERF_KEYS}
        for name, rs in runs.items()
    }


def toy_table(toy: dict[str, Any], budgets: tuple[int, ...]) -> str:
    """Markdown: per target and method, the final figures and the KL at a short budget."""
    final, short = str(budgets[-1]), str(budgets[min(2, len(budgets) - 1)])
    lines = [
        f"| toy target | method | KL(target‖policy) @{short} steps | KL(target‖policy) @{final} | "
        f"modes covered @{final} | in-mode mass @{final} | ms / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, by_method in toy["mean_over_seeds"].items():
        spec = TARGETS[target]
        name = (
            f"{target} ({','.join(map(str, spec['modes']))}; {','.join(f'{w:g}' for w in spec['weights'])})"
        )
        for method in METHODS:
            a, b = by_method[method][short], by_method[method][final]
            lines.append(
                f"| {name} | {LABELS[method]} | {a['kl_target_policy']:.3f} | {b['kl_target_policy']:.3f} | "
                f"{b['modes_covered']:.2f} | {b['in_mode_mass']:.3f} | {b['ms_per_step']:.2f} |"
            )
    return "\n".join(lines)


def demo_table(demo: dict[str, Any]) -> str:
    """Markdown: per method, the final figures (means over seeds) and the trainer's step times."""
    lines = [
        "| demo task | KL(target‖policy) | correct answers covered | accuracy (avg@32) | distinct correct "
        "/ prompt | step s | rollout s | rewards + log-probs s | update s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        m, r = demo["mean_over_seeds"][method], demo["range_over_seeds"][method]

        def cell(key: str, m: dict = m, r: dict = r) -> str:
            return f"{m[key]:.3f} ({r[key][0]:.3f}-{r[key][1]:.3f})"

        lines.append(
            f"| {LABELS[method]} | {cell('kl_to_target')} | {cell('modes_covered')} | {cell('accuracy')} | "
            f"{m['distinct_correct']:.1f} | {m['perf/step_time_s']:.3f} | {m['perf/rollout_time_s']:.3f} | "
            f"{m['perf/score_and_logprob_time_s']:.3f} | {m['perf/update_time_s']:.3f} |"
        )
    return "\n".join(lines)


def timing_table(timing: dict[str, Any]) -> str:
    """Markdown: per configuration, seconds per step and per phase (:func:`timing_summary`)."""
    head = timing["median_s"]["flowrl"]["perf/step_time_s"]
    lines = [
        "| configuration | optimizer steps / batch | step s | vs FlowRL (head) | rollout s "
        "| rewards + log-probs s | update s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in timing["median_s"].items():
        method, _, steps = name.partition("/")
        lines.append(
            f"| {LABELS[method]} | {steps or 1} | {m['perf/step_time_s']:.3f} | "
            f"{m['perf/step_time_s'] / head - 1:+.1%} | {m['perf/rollout_time_s']:.3f} | "
            f"{m['perf/score_and_logprob_time_s']:.3f} | {m['perf/update_time_s']:.3f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Toy KL against steps (every target), and the demo's KL and coverage against RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowrl.toy import METHOD_COLORS

    styles = ["-", "--", ":", "-."]
    fig, (toy_ax, kl_ax, cov_ax) = plt.subplots(1, 3, figsize=(16, 4.6))
    for k, (target, by_method) in enumerate(result["toy"]["mean_over_seeds"].items()):
        for method in METHODS:
            steps = sorted(by_method[method], key=int)
            toy_ax.plot(
                [int(s) for s in steps],
                [max(by_method[method][s]["kl_target_policy"], 1e-4) for s in steps],
                styles[k % len(styles)],
                marker="o",
                markersize=3,
                color=METHOD_COLORS[method],
                label=f"{LABELS[method]}, {target}",
            )
    toy_ax.set(xscale="log", yscale="log", xlabel="optimizer steps", ylabel="KL(target‖policy), exact")
    toy_ax.set_title("toy (mean over seeds)")
    toy_ax.legend(fontsize=6, ncol=1, frameon=False)
    for seed, report in result["demo"]["per_seed"].items():
        for method in METHODS:
            points = report["trajectories"][method]
            xs = [p["step"] for p in points]
            for ax, key in ((kl_ax, "kl_to_target"), (cov_ax, "modes_covered")):
                ax.plot(
                    xs,
                    [p[key] for p in points],
                    styles[int(seed) % len(styles)],
                    marker="o",
                    markersize=3,
                    color=METHOD_COLORS[method],
                    label=f"{LABELS[method]}, seed {seed}",
                )
    kl_ax.set(xlabel="RL step", ylabel="KL(target‖policy), exact", title="demo task: distance to the target")
    kl_ax.set_yscale("log")
    cov_ax.set(xlabel="RL step", ylabel="share of correct answers covered", title="demo task: coverage")
    kl_ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--plot", help="write the figure (PNG) to this file")
    parser.add_argument("--workdir", help="keep the demo runs here (default: a temporary directory)")
    parser.add_argument(
        "--from-json", metavar="PATH", help="run nothing: print the tables of a saved run (and --plot it)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one timed trainer run (run_timing)
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result_file"]).write_text(json.dumps(_common.run_project_trainer(spec)))
        return 0
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(toy_table(result["toy"], tuple(result["workload"]["budgets"])))
        print()
        print(demo_table(result["demo"]))
        if "timing" in result:
            print()
            print(timing_table(result["timing"]))
        print(f"\nwall time {result['wall_time_s']:.0f}s; command: {result['environment']['command']}")
        if args.plot:
            plot(result, Path(args.plot))
            print(f"wrote {args.plot}")
        return 0
    preset = PRESETS[args.preset]
    env = _common.environment()
    _common.print_load(env)
    started = time.perf_counter()
    toy = run_toy(preset)
    with tempfile.TemporaryDirectory() as tmp:
        demo = run_demo(preset, Path(args.workdir or tmp))
        timing = run_timing(TIMING_WORKLOADS[args.preset], Path(args.workdir or tmp) / "timing")
    wall = time.perf_counter() - started
    result = {"benchmark": "log_z_ablation", "preset": args.preset, "workload": preset, "toy": toy,
              "demo": demo, "timing": timing, "wall_time_s": round(wall, 1)}  # fmt: skip

    seeds = f"toy {len(preset['toy_seeds'])} seeds, demo {len(preset['demo_seeds'])} seeds"
    print(
        f"\n{args.preset} preset: {seeds} x {preset['demo_steps']} RL steps; means over seeds (demo: range)\n"
    )
    print(toy_table(toy, preset["budgets"]))
    print()
    print(demo_table(demo))
    print()
    print(timing_table(timing))
    print(f"\nwall time {wall:.0f}s")
    _common.print_load(env)
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    _common.finish(env, result, args.json)
    if not all(math.isfinite(m["kl_to_target"]) for m in demo["mean_over_seeds"].values()):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
