"""Peak memory per parameter, measured beside the memory plan's prediction (``flowrl plan``).

    .venv/bin/python benchmarks/memory.py --json benchmarks/results/memory_cpu.json
    .venv/bin/python benchmarks/memory.py --device cuda --preset cuda --json /tmp/memory_cuda.json
    .venv/bin/python benchmarks/memory.py --preset smoke --json /tmp/memory_smoke.json

Workload (preset ``cpu``): a Qwen2 with Qwen2.5-0.5B's shape and random weights (hidden 896, 24
layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings: 494,032,768
parameters), 2 prompts x 2 samples x 16 new tokens (forced to full length), one micro-batch of 4, 2 RL
steps; preset ``cuda``: the same on Qwen2.5-1.5B's shape (the fsdp2 rows need 2 GPUs: with fewer they
fail in their rows, saying so). Rows, each in its own process:

* ``flowrl``: the project's trainer, FlowRL, full fine-tuning (policy and reference in the policy's
  dtype on CPU: float32);
* ``flowrl_bf16_ref``: the same with the reference copy in bfloat16 (``model.ref_dtype``; a GPU run's
  default);
* ``flowrl_in_backward``: the same (bf16 reference) with ``train.optimizer_in_backward=true``: each
  parameter's AdamW step runs as soon as its gradient is complete, which needs ``optim.max_grad_norm=0``
  (no clipping) and one micro-batch per optimizer step (the workload has one);
* ``grpo``: the project's trainer, GRPO at kl_coef 0 (no reference model);
* ``flowrl_lora``: FlowRL with LoRA rank 16 on every linear layer over a bfloat16 base (loaded from a
  bfloat16 copy of the same weights); the reference is the base with its adapters disabled;
* ``flowrl_fsdp2``: FlowRL, full fine-tuning, ``train.strategy=fsdp2`` under ``torchrun
  --nproc_per_node 2`` (the figure is per rank: the larger of the two); ``flowrl_fsdp2_bf16_ref``
  the same with the reference in bfloat16; ``flowrl_fsdp2_bf16`` the same with bfloat16 compute as well
  (``train.bf16=true``, a GPU run's default: FSDP2 gathers bfloat16 parameters for the rollout and the
  forwards, float32 shards, gradients and optimizer states);
* ``trl_grpo``: TRL's ``GRPOTrainer`` (beta 0, its default: no reference), float32;
* ``trl_grpo_peft``: the same with a peft ``LoraConfig`` (rank 16, all linear layers) over the
  bfloat16 base.

Measured: on CPU the peak resident set size of the process (``/usr/bin/time -v``'s "Maximum resident
set size", the largest over a torchrun's ranks; each process's own ``VmHWM`` is in the JSON too); on
CUDA ``torch.cuda.max_memory_allocated`` (the plan's peak minus the CUDA context, which that figure does
not count). Beside each: the plan's peak for the same config (``flowrl.plan.plan_memory``; for the TRL
rows the plan of the project's equivalent run, GRPO at kl_coef 0 with or without LoRA, with TRL's own
process baseline and, named in :func:`trl_terms_gb`, what TRL's generation holds beyond it) and the
relative error. A ``baseline`` pair of rows (the project's trainer and TRL on
a 0.2M-parameter model) measures what a process holds besides the model. The cumulative peak after
each phase of the project's trainer (load, rollout, log-prob passes, update, optimizer step) is
recorded per step, so the phase that set the peak can be read off.

A row whose feature is missing (peft not installed, a strategy the trainer refuses) fails in its row
with the error; it is never skipped silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(shape="qwen2.5-0.5b", prompts=2, samples=2, max_new_tokens=16, micro_batch=4, steps=2,
                lora_rank=16),
    # the GPU check: the same workload on Qwen2.5-1.5B's shape (1.54B parameters)
    "cuda": dict(shape="qwen2.5-1.5b", prompts=2, samples=2, max_new_tokens=16, micro_batch=4, steps=2,
                 lora_rank=16),
    "smoke": dict(shape="tiny", prompts=2, samples=2, max_new_tokens=4, micro_batch=4, steps=2, lora_rank=4),
}  # fmt: skip
ROWS = (
    "flowrl",
    "flowrl_bf16_ref",
    "flowrl_in_backward",
    "grpo",
    "flowrl_lora",
    "flowrl_fsdp2",
    "flowrl_fsdp2_bf16_ref",
    "flowrl_fsdp2_bf16",
    "trl_grpo",
    "trl_grpo_peft",
)
BASELINE_ROWS = ("baseline", "trl_baseline")
GOAL_RELATIVE_ERROR = 0.15  # the plan within 15% of the measured peak, every row on CPU
# data.max_prompt_length of every row: the digit-sum prompts ("sum 13:") are at most 7 tokens, so the
# plan's worst case (prompt + response at their configured maxima) is the workload's actual length
MAX_PROMPT_LENGTH = 8
GiB = 2**30


def row_settings(row: str, w: dict[str, Any]) -> dict[str, Any]:
    """What a row runs: trainer, algorithm, dtype, LoRA rank, processes."""
    lora = w["lora_rank"] if row in ("flowrl_lora", "trl_grpo_peft") else 0
    return {
        "trainer": "trl" if row.startswith("trl_") else "flowrl",
        "algorithm": "grpo" if row in ("grpo", "baseline") or row.startswith("trl_") else "flowrl",
        "dtype": "bfloat16" if lora else "float32",
        "lora_rank": lora,
        "ranks": 2 if row.startswith("flowrl_fsdp2") else 1,
        "strategy": "fsdp2" if row.startswith("flowrl_fsdp2") else "ddp",
        "shape": "tiny" if row in BASELINE_ROWS else w["shape"],
        # the reference copy in bf16 (what a GPU run gets by default; on CPU the policy's dtype is)
        "ref_dtype": "bfloat16" if row.endswith(("_bf16_ref", "_bf16", "_in_backward")) else None,
        # bf16 compute (train.bf16, a GPU run's default): under fsdp2, bf16 gathered parameters
        "bf16_compute": row.endswith("_bf16"),
        # each parameter stepped as its gradient completes (no clipping; the workload is one micro-batch)
        "in_backward": row.endswith("_in_backward"),
    }


def overrides(
    row: str, w: dict[str, Any], *, model_dir: Path, data_file: Path, out: Path, device: str
) -> list[str]:
    s = row_settings(row, w)
    extra: dict[str, Any] = {
        "model.dtype": s["dtype"],
        "data.max_prompt_length": MAX_PROMPT_LENGTH,
        "train.strategy": s["strategy"],
        "reward.num_workers": 0,
    }
    if s["lora_rank"]:
        extra["model.lora.rank"] = s["lora_rank"]
    if s["ref_dtype"]:
        extra["model.ref_dtype"] = s["ref_dtype"]
    if s["bf16_compute"]:
        extra["train.bf16"] = True
    if s["in_backward"]:
        extra["train.optimizer_in_backward"] = True
        extra["optim.max_grad_norm"] = 0
    return _common.trainer_overrides(
        model_dir=model_dir,
        data_file=data_file,
        output_dir=out,
        algorithm=s["algorithm"],
        prompts=w["prompts"],
        samples=w["samples"],
        max_new_tokens=w["max_new_tokens"],
        micro_batch=w["micro_batch"],
        steps=w["steps"],
        device=device,
        extra=extra,
    )


# -- children --------------------------------------------------------------------------------------


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseMeter:
    """The peak so far at the end of each phase (CPU: VmHWM, never reset, so /usr/bin/time's figure
    stays the whole process's); on CUDA the peak allocated within each phase (reset at its start)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.torch = torch
        self.marks: list[dict[str, Any]] = []

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def mark(self, phase: str, step: int) -> None:
        entry: dict[str, Any] = {"phase": phase, "step": step, "peak_rss_gb": round(vm_hwm_bytes() / GiB, 3)}
        if self.cuda:
            self.torch.cuda.synchronize()
            entry["cuda_peak_allocated_gb"] = round(self.torch.cuda.max_memory_allocated() / GiB, 3)
            entry["cuda_allocated_gb"] = round(self.torch.cuda.memory_allocated() / GiB, 3)
        self.marks.append(entry)


def run_flowrl(spec: dict[str, Any]) -> dict[str, Any]:
    """The project's trainer with every phase marked; responses forced to full length, no checkpoint."""
    import torch

    from flowrl.config import load_config
    from flowrl.trainer import Trainer

    cfg = load_config(None, spec["overrides"])
    meter = PhaseMeter(spec["device"])
    rss_after_import = vm_hwm_bytes()
    meter.start()
    trainer = Trainer(cfg, overwrite=True)
    meter.mark("load", 0)
    trainer.sampling = dataclasses.replace(trainer.sampling, ignore_eos=True)
    trainer._save = lambda: None  # a checkpoint is not what is measured

    def phase(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            meter.start()
            out = fn(*args, **kwargs)
            meter.mark(name, trainer.step)
            return out

        return wrapped

    trainer._rollout = phase("rollout", trainer._rollout)
    trainer.actor.logprobs = phase("log-prob passes", trainer.actor.logprobs)
    step = trainer.optimizer.step

    def optimizer_step(*args: Any, **kwargs: Any) -> Any:
        meter.mark("update", trainer.step)  # forward and backward of the mini-batch
        meter.start()
        out = step(*args, **kwargs)
        meter.mark("optimizer step", trainer.step)
        return out

    trainer.optimizer.step = optimizer_step
    update = trainer.actor.update

    def timed_update(*args: Any, **kwargs: Any) -> Any:
        meter.start()
        return update(*args, **kwargs)

    trainer.actor.update = timed_update
    try:
        trainer.fit()
    finally:
        trainer.dp.close()
    policy = trainer.policy
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "peak_rss_gb": round(vm_hwm_bytes() / GiB, 3),
        "rss_after_import_gb": round(rss_after_import / GiB, 3),
        "cuda_max_allocated_gb": round(torch.cuda.max_memory_allocated() / GiB, 3) if meter.cuda else None,
        "phases": meter.marks,
        "parameters_on_this_rank": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in policy.model.parameters()
        ),
        "trainable_parameters": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel()
            for g in trainer.optimizer.param_groups
            for p in g["params"]
        ),
        "reference_model": trainer.ref_policy is not None,
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer (beta 0) on the same model, prompts and lengths; with peft LoRA when asked."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    w, s = spec["workload"], spec["settings"]
    rss_after_import = vm_hwm_bytes()
    cuda = spec["device"].startswith("cuda")
    tokenizer, dataset = _common.trl_dataset(spec["model_dir"], w["prompts"])
    args = GRPOConfig(**_common.trl_grpo_args(spec, s["dtype"]))
    peft_config = None
    if s["lora_rank"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=s["lora_rank"], lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    meter = PhaseMeter(spec["device"])
    meter.start()
    trainer = GRPOTrainer(
        spec["model_dir"],
        reward_funcs=_common.digit_sum_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    meter.mark("load", 0)

    def phase(name: str, fn: Any) -> Any:  # TRL's generation and its training step, marked
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            meter.start()
            out = fn(*args, **kwargs)
            meter.mark(name, trainer.state.global_step + 1)
            return out

        return wrapped

    trainer._generate = phase("rollout", trainer._generate)
    trainer.training_step = phase("update", trainer.training_step)
    trainer.train()
    model = trainer.model
    return {
        "rank": 0,
        "peak_rss_gb": round(vm_hwm_bytes() / GiB, 3),
        "rss_after_import_gb": round(rss_after_import / GiB, 3),
        "cuda_max_allocated_gb": round(torch.cuda.max_memory_allocated() / GiB, 3) if cuda else None,
        "phases": meter.marks,
        "parameters_on_this_rank": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "reference_model": getattr(trainer, "ref_model", None) is not None,
        "completion_length": [
            h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
        ],
    }


def child(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = run_trl(spec) if spec["settings"]["trainer"] == "trl" else run_flowrl(spec)
    rank = os.environ.get("RANK")
    out = Path(spec["result_file"] + (f".rank{rank}" if rank is not None else ""))
    out.write_text(json.dumps(result))


# -- parent ----------------------------------------------------------------------------------------


def save_models(work: Path, shape: str) -> dict[str, Path]:
    """The random model in float32 and the same weights in bfloat16 (for the bf16-base rows)."""
    import torch

    dirs = {"float32": work / f"model-{shape}-float32", "bfloat16": work / f"model-{shape}-bfloat16"}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    tokenizer = _common.build_tokenizer(_common.MODEL_SHAPES[shape]["vocab_size"])
    model = _common.build_model(shape, tokenizer)
    for dtype, directory in dirs.items():
        model.to(getattr(torch, dtype)).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return dirs


def run_row(
    row: str, spec: dict[str, Any], work: Path, *, timeout: float, threads: int | None
) -> dict[str, Any]:
    """Run one row's process(es) under /usr/bin/time -v; the measured peak and each process's report."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_file, result_file = logs / f"{row}.spec.json", logs / f"{row}.result.json"
    spec_file.write_text(json.dumps({**spec, "result_file": str(result_file)}))
    ranks = spec["settings"]["ranks"]
    script = [str(Path(__file__).resolve()), "--child", str(spec_file)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script]  # fmt: skip
    else:
        command = [sys.executable, *script]
    time_bin = Path("/usr/bin/time")
    if time_bin.exists():
        command = [str(time_bin), "-v", *command]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **_common.thread_env(threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(_common.REPO)
    log = logs / f"{row}.log"
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            command, stdout=f, stderr=subprocess.STDOUT, cwd=_common.REPO, env=env, timeout=timeout
        )
    text = log.read_text()
    if proc.returncode != 0:
        tail = "\n".join(line for line in text.splitlines()[-40:] if "Command being timed" not in line)
        raise RuntimeError(f"{row} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    reports = []
    for path in sorted(logs.glob(f"{row}.result.json*")):
        reports.append(json.loads(path.read_text()))
        path.unlink()
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    time_peak = int(found.group(1)) * 1024 / GiB if found else None
    return {
        "processes": reports,
        "peak_rss_gb": round(
            time_peak if time_peak is not None else max(r["peak_rss_gb"] for r in reports), 3
        ),
        "peak_rss_source": "/usr/bin/time -v" if time_peak is not None else "VmHWM",
        "cuda_max_allocated_gb": max((r["cuda_max_allocated_gb"] or 0) for r in reports) or None,
        "process_wall_s": round(time.perf_counter() - started, 1),
    }


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_row(
    row: str,
    w: dict[str, Any],
    cfg_overrides: list[str],
    model_dir: Path,
    device: str,
    baselines: dict[str, float],
) -> dict[str, Any]:
    """The plan's prediction for a row (for TRL rows: the project's equivalent run, TRL's baseline)."""
    from flowrl.config import load_config
    from flowrl.plan import CPU_BASELINE_GB, plan_memory

    s = row_settings(row, w)
    baseline = CPU_BASELINE_GB
    if s["trainer"] == "trl" and "trl_baseline" in baselines and "baseline" in baselines:
        baseline = CPU_BASELINE_GB + baselines["trl_baseline"] - baselines["baseline"]
    cfg = load_config(None, cfg_overrides)
    plan = plan_memory(
        cfg,
        gpus=s["ranks"],
        gpu_memory_gb=None,
        device=device,
        model_config=model_dir / "config.json",
        suggest=False,
        cpu_baseline_gb=baseline,
    )
    return plan.to_dict()


def trl_terms_gb(s: dict[str, Any], w: dict[str, Any], plan: dict[str, Any], device: str) -> dict[str, float]:
    """What TRL's run holds that the project's equivalent does not, found by measurement.

    ``peft_generate_head_copy``: TRL generates through peft's ``generate``, which on CPU makes a
    contiguous copy of the output head's weight for every sequence of the generation batch in a batched
    matmul (``aten::contiguous`` of a [4, 896, 151936] bf16 tensor, 1.01 GB, in torch's profiler on the
    Qwen2.5-0.5B shape; a bare peft model's ``generate`` peaks 1.0 GB above its resident set, the same
    model without peft does not). The project's decode loop calls the model's forward for the last
    position only.
    """
    if s["trainer"] != "trl" or not s["lora_rank"] or device != "cpu":
        return {}
    m = plan["model"]
    copy = w["prompts"] * w["samples"] * m["hidden_size"] * m["vocab_size"] * 2  # bf16 base
    return {"peft_generate_head_copy": round(copy / GiB, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--no-baseline", action="store_true", help="skip the two baseline rows")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    _common.add_process_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0

    env = _common.environment()
    w = dict(PRESETS[args.preset])
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    order = ([] if args.no_baseline else list(BASELINE_ROWS)) + rows
    results: dict[str, Any] = {}
    baselines: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        from flowrl.data.schema import write_rows

        data_file = write_rows(_common.prompt_rows(w["prompts"]), work / "prompts.jsonl")
        for i, row in enumerate(order):
            s = row_settings(row, w)
            dirs = save_models(work, s["shape"])
            model_dir = dirs[s["dtype"]]
            print(f"[{i + 1}/{len(order)}] {row} (load {_common.load_average()[0]})", flush=True)
            # The TRL rows' plan is the project's equivalent run: GRPO at kl_coef 0, same dtype and LoRA.
            cfg_overrides = overrides(
                row, w, model_dir=model_dir, data_file=data_file, out=work / "runs" / row, device=args.device
            )
            spec = {"row": row, "settings": s, "workload": w, "device": args.device,
                    "model_dir": str(model_dir), "output_dir": str(work / "runs" / row),
                    "overrides": cfg_overrides}  # fmt: skip
            entry: dict[str, Any] = {"settings": s}
            gpus = _visible_gpus() if args.device == "cuda" else None
            if gpus is not None and s["ranks"] > gpus:  # reported in its row, never skipped silently
                entry["error"] = f"needs {s['ranks']} GPUs (one per rank), this machine has {gpus}"
                print(f"  {row} FAILED: {entry['error']}", flush=True)
                results[row] = entry
                continue
            try:
                entry.update(run_row(row, spec, work, timeout=args.timeout, threads=args.threads))
            except Exception as exc:  # noqa: BLE001 - a failed row is reported in its row, loudly
                entry["error"] = str(exc)
                print(f"  {row} FAILED: {str(exc).splitlines()[0]}", flush=True)
                results[row] = entry
                continue
            if row in BASELINE_ROWS:
                baselines[row] = entry["peak_rss_gb"]
            if row not in BASELINE_ROWS:
                try:
                    plan = plan_row(row, w, cfg_overrides, model_dir, args.device, baselines)
                except Exception as exc:  # noqa: BLE001
                    entry["plan_error"] = str(exc)
                    results[row] = entry
                    continue
                params = plan["parameters"]["total"]
                measured = entry["peak_rss_gb"] if args.device == "cpu" else entry["cuda_max_allocated_gb"]
                planned = plan["peak_gb_per_device"] - (plan["runtime_gb"] if args.device == "cuda" else 0)
                extra = trl_terms_gb(s, w, plan, args.device)
                if extra:  # TRL's own generation path: beside the plan of the project's equivalent run
                    entry["planned_gb_project_equivalent"] = round(planned, 3)
                    entry["trl_terms_gb"] = extra
                    rollout = plan["phases_gb"]["rollout"] + sum(extra.values())
                    planned = max(planned, rollout - (plan["runtime_gb"] if args.device == "cuda" else 0))
                entry["plan"] = {
                    k: plan[k]
                    for k in (
                        "peak_gb_per_device",
                        "peak_phase",
                        "phases_gb",
                        "components_gb",
                        "runtime_gb",
                        "setup",
                        "parameters",
                        "model",
                    )
                }
                entry["measured_gb"] = measured
                entry["planned_gb"] = round(planned, 3)
                entry["relative_error"] = round((planned - measured) / measured, 4)
                entry["bytes_per_parameter"] = round(measured * GiB / params, 2)
                entry["planned_bytes_per_parameter"] = round(planned * GiB / params, 2)
            results[row] = entry
            print(f"  {_row_line(row, entry, args.device)}", flush=True)

    measured_rows = {r: e for r, e in results.items() if "relative_error" in e}
    goal = {
        "relative_error_at_most": GOAL_RELATIVE_ERROR,
        "met": bool(measured_rows)
        and all(abs(e["relative_error"]) <= GOAL_RELATIVE_ERROR for e in measured_rows.values())
        and not any("error" in e for e in results.values()),
        "failed_rows": [r for r, e in results.items() if "error" in e or "plan_error" in e],
    }
    print()
    print(_table(results, args.device))
    print(
        f"goal: plan within {GOAL_RELATIVE_ERROR:.0%} of the measured peak on every row: "
        f"{'met' if goal['met'] else 'NOT met'}"
    )
    _common.print_load(env)
    _common.finish(
        env,
        {"benchmark": "memory", "preset": args.preset, "device": args.device, "workload": w,
         "baselines_gb": baselines, "rows": results, "goal": goal},
        args.json,
    )  # fmt: skip
    return 0


def _row_line(row: str, e: dict[str, Any], device: str) -> str:
    if "error" in e:
        return f"{row}: FAILED"
    if "relative_error" not in e:
        return f"{row}: peak {e['peak_rss_gb']:.2f} GB"
    error = e["relative_error"]
    return f"{row}: measured {e['measured_gb']:.2f} GB, planned {e['planned_gb']:.2f} GB ({error:+.1%})"


def _table(results: dict[str, Any], device: str) -> str:
    what = "peak RSS" if device == "cpu" else "max allocated"
    w = max(map(len, [*results, "row"])) + 2  # the row names' column
    lines = [
        f"{'row':<{w}}{what + ' GB':>16}{'B/param':>9}{'planned GB':>12}{'B/param':>9}{'error':>8}"
        "  plan's peak phase"
    ]
    for row, e in results.items():
        if "error" in e:
            lines.append(f"{row:<{w}}{'FAILED: ' + e['error'].splitlines()[0][:90]}")
        elif "relative_error" in e:
            lines.append(
                f"{row:<{w}}{e['measured_gb']:>16.2f}{e['bytes_per_parameter']:>9.2f}{e['planned_gb']:>12.2f}"
                f"{e['planned_bytes_per_parameter']:>9.2f}{e['relative_error']:>+8.1%}"
                f"  {e['plan']['peak_phase']}"
            )
        else:
            lines.append(f"{row:<{w}}{e['peak_rss_gb']:>16.2f}{'':>9}{'(process baseline)':>21}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
