"""The project's trainer against TRL's GRPOTrainer (and the project's TRL adapter): seconds per RL step.

    .venv/bin/python benchmarks/vs_trl.py --preset cpu --json outputs/bench/vs_trl_cpu.json
    .venv/bin/python benchmarks/vs_trl.py --preset gpu --json outputs/bench/vs_trl_gpu.json

One RL step = generate ``prompts x samples`` completions of exactly ``max_new_tokens`` tokens with
transformers ``generate``, score them, and make one optimizer step on all of them in micro-batches of
``micro_batch``. Same model directory (a Qwen2 config with random weights, saved once), prompts,
reward, seed, learning rate, precision and gradient checkpointing on every side. Completions are forced
to full length on both sides: the project's engine with ``SamplingParams.ignore_eos``, TRL with
``generation_kwargs={"min_new_tokens": max_new_tokens}`` (EOS cannot be sampled), so both train on the
same number of tokens (checked: the JSON records each side's mean completion length).

Contestants, each in its own process, ``--repeats`` times in mirrored order:

* ``flowrl``: the project's trainer, FlowRL (log Z head, reference model and its forward every step);
* ``grpo``: the project's trainer, GRPO at its default ``kl_coef`` 0: no reference model (what TRL's
  GRPO runs at its default ``beta=0``);
* ``trl_grpo``: ``trl.GRPOTrainer`` with its defaults for the loss (``beta=0``: no reference model);
* ``trl_flowrl``: ``flowrl.integrations.trl.FlowRLTrainer`` (TRL's loop, FlowRL's loss, reference model),
  when it imports.

Step time is wall time between consecutive ends of steps (the project: its logger call; TRL: the
``on_step_end`` callback), so everything either loop does counts; the first ``--warmup`` steps are left
out. Tokens per second = completion tokens per step / step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores: a few minutes for all contestants, twice.
    "cpu": dict(shape="small", prompts=8, samples=4, max_new_tokens=64, micro_batch=16, steps=5, warmup=2,
                dtype="float32"),
    # The reference workload: Qwen2.5-0.5B shape, bf16, 64 x 8 x 256, micro-batches of 64.
    "gpu": dict(shape="qwen2.5-0.5b", prompts=64, samples=8, max_new_tokens=256, micro_batch=64, steps=5,
                warmup=2, dtype="bfloat16"),
    "smoke": dict(shape="tiny", prompts=2, samples=2, max_new_tokens=4, micro_batch=4, steps=2, warmup=1,
                  dtype="float32"),
}  # fmt: skip
CONTESTANTS = ("flowrl", "grpo", "trl_grpo", "trl_flowrl")
GOALS = {"cpu": ("throughput_ratio", 2.0), "gpu": ("seconds_per_step", 3.0)}
TRL_STEP_S_H200 = (11.6, 12.0)  # issue 7: TRL 1.16 on one H200, the gpu preset's workload


# -- children --------------------------------------------------------------------------------------


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    w = spec["workload"]
    rss_after_import = _common.peak_rss_mib()
    cuda = spec["device"].startswith("cuda")
    n = w["prompts"] * w["samples"]
    tokenizer, dataset = _common.trl_dataset(spec["model_dir"], w["prompts"])
    common = {
        **_common.trl_grpo_args(spec, w["dtype"]),
        # the project's sampling and optimizer settings
        **dict(temperature=1.0, top_p=1.0, top_k=0, weight_decay=0.1, max_grad_norm=1.0),
    }
    if spec["contestant"] == "trl_flowrl":
        from flowrl.integrations.trl import FlowRLConfig, FlowRLTrainer

        trainer_cls, args = FlowRLTrainer, FlowRLConfig(**common)
    else:
        from trl import GRPOConfig, GRPOTrainer

        trainer_cls, args = GRPOTrainer, GRPOConfig(**common)

    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer = trainer_cls(
        spec["model_dir"],
        reward_funcs=_common.digit_sum_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    walls = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    warmup = spec["warmup_steps"]
    tokens = [n * length for length in lengths]
    return {
        "torch_threads": torch.get_num_threads(),
        "reference_model": getattr(trainer, "ref_model", None) is not None,
        "per_step": {
            "step_wall_s": [round(x, 4) for x in walls],
            "completion_length": lengths,
            "tokens_per_s": [round(t / s, 1) for t, s in zip(tokens, walls, strict=True)],
        },
        "steady_state": {"step_wall_s": _common.summarize(walls[warmup:])},
        "warmup_steps": warmup,
        "memory": {
            **_common.peak_memory(torch.device(spec["device"])),
            "rss_after_import_mib": rss_after_import,
        },
    }


def child(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    if spec["contestant"].startswith("trl_"):
        result = run_trl(spec)
    else:
        result = _common.run_project_trainer(spec)
        result["per_step"]["completion_length"] = result["per_step"]["rollout/response_length"]
        result["per_step"]["tokens_per_s"] = result["per_step"]["perf/tokens_per_s"]
        n = spec["workload"]["prompts"] * spec["workload"]["samples"]
        # perf/tokens_per_s divides by the trainer's own step time; use the loop's wall time here, as for TRL.
        result["per_step"]["tokens_per_s"] = [
            round(n * length / wall, 1)
            for length, wall in zip(
                result["per_step"]["completion_length"], result["per_step"]["step_wall_s"], strict=True
            )
        ]
    Path(spec["result_file"]).write_text(json.dumps(result))


# -- parent ----------------------------------------------------------------------------------------


def trl_flowrl_available() -> str | None:
    """None when the project's TRL adapter imports, else why not."""
    import subprocess

    probe = subprocess.run(
        [sys.executable, "-c", "import flowrl.integrations.trl as m; m.FlowRLTrainer; m.FlowRLConfig"],
        capture_output=True,
        text=True,
        cwd=_common.REPO,
    )
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def pooled(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [v for run in runs for v in run["per_step"][key][run["warmup_steps"] :]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_run_arguments(parser, PRESETS, CONTESTANTS, what="contestant")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0

    env = _common.environment()
    w, device, contestants = _common.resolve_run(parser, args, PRESETS, CONTESTANTS, what="contestant")
    skipped = {}
    if "trl_flowrl" in contestants:
        why = trl_flowrl_available()
        if why:
            skipped["trl_flowrl"] = why
            contestants.remove("trl_flowrl")
            print(f"skipping trl_flowrl: flowrl.integrations.trl does not import ({why})")
    order = _common.mirrored(contestants, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_dir = work / f"model-{w['shape']}-{w['dtype']}"
        if not (model_dir / "config.json").is_file():
            import torch

            tokenizer = _common.build_tokenizer(_common.MODEL_SHAPES[w["shape"]]["vocab_size"])
            model = _common.build_model(w["shape"], tokenizer).to(getattr(torch, w["dtype"]))
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        from flowrl.data.schema import write_rows

        data_file = write_rows(_common.prompt_rows(w["prompts"]), work / "prompts.jsonl")
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contestants}
        for i, contestant in enumerate(order):
            name = f"{i:02d}-{contestant}"
            spec: dict[str, Any] = {
                "contestant": contestant,
                "workload": w,
                "device": device,
                "model_dir": str(model_dir),
                "output_dir": str(work / "runs" / name),
                "warmup_steps": w["warmup"],
            }
            if not contestant.startswith("trl_"):
                spec["overrides"] = _common.trainer_overrides(
                    model_dir=model_dir,
                    data_file=data_file,
                    output_dir=work / "runs" / name,
                    algorithm=contestant,
                    prompts=w["prompts"],
                    samples=w["samples"],
                    max_new_tokens=w["max_new_tokens"],
                    micro_batch=w["micro_batch"],
                    steps=w["steps"],
                    device=device,
                    extra={"model.dtype": w["dtype"], "train.bf16": device.startswith("cuda")},
                )
            print(f"[{i + 1}/{len(order)}] {contestant} (load {_common.load_average()[0]})", flush=True)
            runs[contestant].append(
                _common.run_child(
                    Path(__file__), spec, work / "logs", name, timeout=3600, threads=args.threads
                )
            )

    summary = {}
    for contestant, c_runs in runs.items():
        walls = pooled(c_runs, "step_wall_s")
        summary[contestant] = {
            "reference_model": c_runs[0]["reference_model"],
            "seconds_per_step": round(statistics.median(walls), 4),
            "seconds_per_step_min_max": [round(min(walls), 4), round(max(walls), 4)],
            "tokens_per_s": round(statistics.median(pooled(c_runs, "tokens_per_s")), 1),
            "completion_length": statistics.fmean(pooled(c_runs, "completion_length")),
            "peak_memory": {k: max(r["memory"][k] for r in c_runs) for k in c_runs[0]["memory"]},
        }
    comparisons = {}
    if "trl_grpo" in summary:
        trl_rate = summary["trl_grpo"]["tokens_per_s"]
        for c in summary:
            if c != "trl_grpo":
                comparisons[f"{c}_vs_trl_grpo_throughput"] = round(summary[c]["tokens_per_s"] / trl_rate, 3)
    if "trl_flowrl" in summary and "flowrl" in summary:
        comparisons["flowrl_vs_trl_flowrl_throughput"] = round(
            summary["flowrl"]["tokens_per_s"] / summary["trl_flowrl"]["tokens_per_s"], 3
        )
    goal_kind, goal = GOALS.get(args.preset, ("throughput_ratio", 2.0))
    goal_result: dict[str, Any] = {"kind": goal_kind, "goal": goal}
    if "flowrl" in summary:
        if goal_kind == "seconds_per_step":
            goal_result["figure"] = summary["flowrl"]["seconds_per_step"]
            goal_result["met"] = goal_result["figure"] <= goal
            goal_result["trl_on_h200_from_issue_s"] = TRL_STEP_S_H200
        elif "flowrl_vs_trl_grpo_throughput" in comparisons:
            goal_result["figure"] = comparisons["flowrl_vs_trl_grpo_throughput"]
            goal_result["met"] = goal_result["figure"] >= goal

    tokens = w["prompts"] * w["samples"] * w["max_new_tokens"]
    print(
        f"\n{args.preset} preset on {device}: model {w['shape']} ({w['dtype']}), {w['prompts']} prompts x "
        f"{w['samples']} samples x {w['max_new_tokens']} tokens = {tokens} completion tokens/step, "
        f"micro-batch {w['micro_batch']}, {w['steps'] - w['warmup']} measured steps x {args.repeats} runs"
    )
    print(
        f"{'contestant':<12}{'ref model':>10}{'s/step':>10}{'tokens/s':>11}{'length':>8}{'peak RSS MiB':>14}"
    )
    for c, s in summary.items():
        print(
            f"{c:<12}{str(s['reference_model']):>10}{s['seconds_per_step']:>10.3f}{s['tokens_per_s']:>11.1f}"
            f"{s['completion_length']:>8.1f}{s['peak_memory']['peak_rss_mib']:>14.0f}"
        )
    for name, value in comparisons.items():
        print(f"{name}: {value:.2f}x")
    if "figure" in goal_result:
        verdict = "met" if goal_result["met"] else "not met"
        print(
            f"goal ({goal_kind} {'>=' if goal_kind == 'throughput_ratio' else '<='} {goal}): "
            f"{goal_result['figure']} -> {verdict}"
        )
    _common.print_load(env)
    _common.finish(
        env,
        {
            "benchmark": "vs_trl",
            "preset": args.preset,
            "device": device,
            "workload": {
                **w,
                "completion_tokens_per_step": tokens,
                "repeats": args.repeats,
                "threads": args.threads,
            },
            "summary": summary,
            "comparisons": comparisons,
            "goal": goal_result,
            "skipped": skipped,
            "runs": runs,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
