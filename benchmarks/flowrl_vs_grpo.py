"""FlowRL against GRPO in the project's trainer: steady-state step time by phase, and peak memory.

    .venv/bin/python benchmarks/flowrl_vs_grpo.py --preset cpu --json outputs/bench/flowrl_vs_grpo_cpu.json
    .venv/bin/python benchmarks/flowrl_vs_grpo.py --preset gpu --json outputs/bench/flowrl_vs_grpo_gpu.json

Same model (a Qwen2 config with random weights), prompts, batch, lengths and seed for every method;
generation is forced to full length (``SamplingParams.ignore_eos``), so every step trains on exactly
``prompts x samples x max_new_tokens`` response tokens whatever the random model samples. Each method
runs in its own process (peak RSS, and on CUDA ``torch.cuda.max_memory_allocated``, are then that
method's), ``--repeats`` times in mirrored order (A B C, C B A, ...) so a change in the machine's load
hits every method alike. The first ``--warmup`` steps of a run are excluded.

Methods:

* ``flowrl``: the paper's objective: log Z head, reference log-probs, trajectory-balance loss;
* ``grpo``: the project's GRPO with its defaults (``kl_coef`` 0): no reference model is loaded or run,
  as most users run GRPO (TRL's default ``beta=0``, DAPO, Dr. GRPO);
* ``grpo_kl``: GRPO with a KL penalty to the reference (``kl_coef`` 0.001, verl's GRPO recipes'
  ``kl_loss_coef``): the same reference pass FlowRL makes.

The phases are the trainer's own metrics: ``perf/rollout_time_s`` (generation),
``perf/score_and_logprob_time_s`` (rewards plus the reference forward), ``perf/update_time_s`` (policy
forward and backward, log Z head, loss, AdamW). So ``grpo_kl - grpo`` in the second phase is the
reference pass, and ``flowrl - grpo`` in the update phase is the head and the loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores: about 2 minutes for the three methods, twice.
    "cpu": dict(shape="small", prompts=8, samples=4, max_new_tokens=64, micro_batch=16, steps=8, warmup=2),
    # The reference workload on one GPU.
    "gpu": dict(shape="qwen2.5-0.5b", prompts=64, samples=8, max_new_tokens=256, micro_batch=64, steps=5,
                warmup=2),
    # The smoke test's: seconds.
    "smoke": dict(shape="tiny", prompts=2, samples=2, max_new_tokens=4, micro_batch=4, steps=2, warmup=1),
}  # fmt: skip
# method -> (algorithm.name, extra overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "flowrl": ("flowrl", {}),
    "grpo": ("grpo", {}),
    "grpo_kl": ("grpo", {"algorithm.loss.kl_coef": 0.001}),
}
GOAL_OVERHEAD = 0.05  # FlowRL within 5% of GRPO's step time (issue 7)
PHASES = {
    "step_wall_s": "step (wall)",
    "perf/rollout_time_s": "rollout",
    "perf/score_and_logprob_time_s": "score + ref",
    "perf/update_time_s": "update",
}


def child(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = _common.run_project_trainer(spec)
    Path(spec["result_file"]).write_text(json.dumps(result))


def pooled_median(runs: list[dict[str, Any]], key: str) -> float:
    """Median over every measured (post-warm-up) step of every repeat."""
    values = [v for run in runs for v in run["per_step"][key][run["warmup_steps"] :]]
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_run_arguments(parser, PRESETS, METHODS, what="method")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0

    env = _common.environment()
    preset, device, methods = _common.resolve_run(parser, args, PRESETS, METHODS, what="method")
    order = _common.mirrored(methods, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_dir = _common.save_model(work / f"model-{preset['shape']}", preset["shape"])
        from flowrl.data.schema import write_rows

        data_file = write_rows(_common.prompt_rows(preset["prompts"]), work / "prompts.jsonl")
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for i, method in enumerate(order):
            name = f"{i:02d}-{method}"
            spec = {
                "warmup_steps": preset["warmup"],
                "overrides": _common.trainer_overrides(
                    model_dir=model_dir,
                    data_file=data_file,
                    output_dir=work / "runs" / name,
                    algorithm=METHODS[method][0],
                    prompts=preset["prompts"],
                    samples=preset["samples"],
                    max_new_tokens=preset["max_new_tokens"],
                    micro_batch=preset["micro_batch"],
                    steps=preset["steps"],
                    device=device,
                    extra=METHODS[method][1],
                ),
            }
            print(f"[{i + 1}/{len(order)}] {method} (load {_common.load_average()[0]})", flush=True)
            runs[method].append(
                _common.run_child(
                    Path(__file__), spec, work / "logs", name, timeout=3600, threads=args.threads
                )
            )

    summary: dict[str, dict[str, Any]] = {}
    for method, method_runs in runs.items():
        first = method_runs[0]
        summary[method] = {
            "reference_model": first["reference_model"],
            "policy_parameters": first["policy_parameters"],
            "log_z_head_parameters": first["log_z_head_parameters"],
            "median_s": {key: round(pooled_median(method_runs, key), 4) for key in PHASES},
            "tokens_per_s": round(pooled_median(method_runs, "perf/tokens_per_s"), 1),
            "response_length": first["per_step"]["rollout/response_length"][-1],
            "peak_memory": {key: max(run["memory"][key] for run in method_runs) for key in first["memory"]},
        }
    comparisons = {}
    if "flowrl" in summary:
        flow = summary["flowrl"]["median_s"]["step_wall_s"]
        for base in ("grpo", "grpo_kl"):
            if base in summary:
                other = summary[base]["median_s"]["step_wall_s"]
                comparisons[f"flowrl_vs_{base}"] = {
                    "overhead": round(flow / other - 1, 4),
                    "goal": GOAL_OVERHEAD,
                    "meets_goal": flow / other - 1 <= GOAL_OVERHEAD,
                }
    if "grpo" in summary and "grpo_kl" in summary:
        key = "perf/score_and_logprob_time_s"
        comparisons["reference_pass_s"] = round(
            summary["grpo_kl"]["median_s"][key] - summary["grpo"]["median_s"][key], 4
        )
    if "grpo" in summary and "flowrl" in summary:
        key = "perf/update_time_s"
        comparisons["head_and_loss_in_update_s"] = round(
            summary["flowrl"]["median_s"][key] - summary["grpo"]["median_s"][key], 4
        )

    tokens = preset["prompts"] * preset["samples"] * preset["max_new_tokens"]
    print(
        f"\n{args.preset} preset on {device}: model {preset['shape']}, {preset['prompts']} prompts x "
        f"{preset['samples']} samples x {preset['max_new_tokens']} tokens ({tokens} response tokens/step), "
        f"micro-batch {preset['micro_batch']}, {preset['steps'] - preset['warmup']} measured steps x "
        f"{args.repeats} runs; medians in seconds"
    )
    print(f"{'method':<12}" + "".join(f"{label:>13}" for label in PHASES.values()) + f"{'peak RSS MiB':>14}")
    for method, s in summary.items():
        cells = "".join(f"{s['median_s'][key]:>13.3f}" for key in PHASES)
        print(f"{method:<12}{cells}{s['peak_memory']['peak_rss_mib']:>14.0f}")
    for name, c in comparisons.items():
        if isinstance(c, dict):
            verdict = "meets" if c["meets_goal"] else "misses"
            print(f"{name}: {c['overhead']:+.1%} step time ({verdict} the goal of <= {c['goal']:.0%})")
        else:
            print(f"{name}: {c:+.3f} s")
    _common.print_load(env)
    _common.finish(
        env,
        {
            "benchmark": "flowrl_vs_grpo",
            "preset": args.preset,
            "device": device,
            "workload": {
                **preset,
                "response_tokens_per_step": tokens,
                "repeats": args.repeats,
                "threads": args.threads,
            },
            "summary": summary,
            "comparisons": comparisons,
            "runs": runs,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
