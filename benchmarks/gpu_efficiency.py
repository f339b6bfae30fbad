"""Hardware efficiency of the project's trainer: update-phase MFU and rollout decode against its bound.

    .venv/bin/python benchmarks/gpu_efficiency.py --device cuda --json outputs/bench/gpu_efficiency.json
    .venv/bin/python benchmarks/gpu_efficiency.py --device cpu --preset tiny --json outputs/bench/cpu_eff.json

For each model (Qwen2.5-0.5B and -1.5B shapes from config, random weights; CPU: a tiny Qwen2), FlowRL is
trained for a few steps with :class:`flowrl.trainer.Trainer`, generation forced to full length, and its
own per-phase metrics are turned into efficiencies against limits measured on this machine:

* **peak FLOP/s**: a large matmul in the compute dtype (bf16 on GPU, float32 on CPU), best of a few;
* **bandwidth**: a large device-to-device tensor copy (bytes read + bytes written, per second);
* **update MFU** = 6 x parameters x tokens in the update / ``perf/update_time_s`` / peak. Tokens are the
  real prompt + response tokens of every sequence (padding not counted); parameters count the tied
  embedding once (it is the LM head's matmul). Recomputation (gradient checkpointing, the chunked
  log-softmax) and attention FLOPs are not counted, as in PaLM's MFU; the whole update phase is timed
  (forward, backward, log Z head, loss, AdamW);
* **decode efficiency** = response tokens / ``perf/rollout_time_s`` against the bound
  ``B / max(bytes per step / bandwidth, 2 N B / peak)``, where a decode step reads the weights once plus
  the KV cache of all B sequences at their average context (prompt + half the response). Prefill is in
  the measured time, not in the bound (the prompts are a few tokens).

Goals (issue 7): MFU >= 40%, decode >= 50% of the bound.
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
    # The rollout shape (64 prompts x 8 x 256) on the two Qwen2.5 shapes, bf16 weights.
    "gpu": dict(shapes=["qwen2.5-0.5b", "qwen2.5-1.5b"], prompts=64, samples=8, max_new_tokens=256,
                micro_batch=64, steps=3, warmup=1, dtype="bfloat16"),
    # 2 CPU cores, about a minute.
    "tiny": dict(shapes=["tiny", "small"], prompts=8, samples=4, max_new_tokens=64, micro_batch=16, steps=4,
                 warmup=1, dtype="float32"),
    "smoke": dict(shapes=["tiny"], prompts=2, samples=2, max_new_tokens=4, micro_batch=4, steps=2, warmup=1,
                  dtype="float32"),
}  # fmt: skip
GOAL_MFU = 0.40
GOAL_DECODE = 0.50


def child(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    if spec["kind"] == "limits":
        result = measure_limits(spec["device"], spec["dtype"])
    else:
        result = _common.run_project_trainer(spec)
    Path(spec["result_file"]).write_text(json.dumps(result))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best_time(fn: Any, device: str, *, repeats: int, inner: int) -> float:
    """Shortest of ``repeats`` timings of ``inner`` calls, per call (after one untimed call)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def measure_limits(device: str, dtype: str) -> dict[str, Any]:
    """Peak matmul FLOP/s in ``dtype`` and copy bandwidth on ``device``."""
    import torch

    cuda = device.startswith("cuda")
    n = 8192 if cuda else 1024
    operands = [torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2)]
    seconds = _best_time(lambda: operands[0] @ operands[1], device, repeats=5, inner=10 if cuda else 2)
    peak = 2 * n**3 / seconds
    operands.clear()  # free the memory before the copy
    size = (2 << 30) if cuda else (256 << 20)  # bytes
    src = torch.empty(size // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), device, repeats=5, inner=10 if cuda else 2)
    bandwidth = 2 * size / seconds  # read + write
    return {
        "matmul_size": n,
        "matmul_dtype": dtype,
        "peak_flops": peak,
        "copy_bytes": size,
        "bandwidth_bytes_per_s": bandwidth,
        "device_name": torch.cuda.get_device_name() if cuda else _common._cpu_model(),
    }


def kv_bytes_per_token(shape: str, dtype_bytes: int) -> int:
    """K and V of every layer for one token."""
    s = _common.MODEL_SHAPES[shape]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    return 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * head_dim * dtype_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda (the measurement) or cpu (the runnable variant)"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: gpu on cuda, else tiny"
    )
    parser.add_argument("--shapes", help="comma-separated model shapes (default: the preset's)")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: the trainer's default (on for CUDA, off on CPU)",
    )
    _common.add_process_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --preset tiny for the CPU variant")
    env = _common.environment()
    preset = dict(PRESETS[args.preset or ("gpu" if args.device.startswith("cuda") else "tiny")])
    shapes = args.shapes.split(",") if args.shapes else preset["shapes"]
    dtype_bytes = torch.finfo(getattr(torch, preset["dtype"])).bits // 8
    n_seq = preset["prompts"] * preset["samples"]
    extra: dict[str, Any] = {"model.dtype": preset["dtype"], "train.bf16": args.device.startswith("cuda")}
    if args.gradient_checkpointing != "auto":
        extra["model.gradient_checkpointing"] = args.gradient_checkpointing == "on"

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        spec = {"kind": "limits", "device": args.device, "dtype": preset["dtype"]}
        limits = _common.run_child(
            Path(__file__), spec, work / "logs", "limits", timeout=600, threads=args.threads
        )
        print(
            f"measured: peak {limits['peak_flops'] / 1e12:.3g} TFLOP/s ({preset['dtype']} matmul), "
            f"bandwidth {limits['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s (copy)",
            flush=True,
        )
        from flowrl.data.schema import write_rows
        from flowrl.policy import encode_prompt, load_tokenizer

        rows = _common.prompt_rows(preset["prompts"])
        data_file = write_rows(rows, work / "prompts.jsonl")
        for shape in shapes:
            model_dir = work / f"model-{shape}-{preset['dtype']}"
            if not (model_dir / "config.json").is_file():
                tokenizer = _common.build_tokenizer(_common.MODEL_SHAPES[shape]["vocab_size"])
                model = _common.build_model(shape, tokenizer).to(getattr(torch, preset["dtype"]))
                model.save_pretrained(model_dir)
                tokenizer.save_pretrained(model_dir)
                del model
            tokenizer = load_tokenizer(str(model_dir))
            prompt_tokens = sum(len(encode_prompt(tokenizer, r["prompt"])) for r in rows) * preset["samples"]
            spec = {
                "kind": "train",
                "warmup_steps": preset["warmup"],
                "overrides": _common.trainer_overrides(
                    model_dir=model_dir,
                    data_file=data_file,
                    output_dir=work / "runs" / shape,
                    algorithm="flowrl",
                    prompts=preset["prompts"],
                    samples=preset["samples"],
                    max_new_tokens=preset["max_new_tokens"],
                    micro_batch=preset["micro_batch"],
                    steps=preset["steps"],
                    device=args.device,
                    extra=extra,
                ),
            }
            print(f"{shape}: training {preset['steps']} steps (load {_common.load_average()[0]})", flush=True)
            run = _common.run_child(
                Path(__file__), spec, work / "logs", shape, timeout=3600, threads=args.threads
            )
            results[shape] = efficiency(run, limits, shape, preset, n_seq, prompt_tokens, dtype_bytes)

    for shape, r in results.items():
        u, d = r["update"], r["decode"]
        print(
            f"{shape}: {r['parameters'] / 1e6:.1f}M params | update {u['seconds']:.3f}s, "
            f"{u['achieved_flops'] / 1e12:.3g} TFLOP/s, MFU {u['mfu']:.1%} (goal {GOAL_MFU:.0%}) | decode "
            f"{d['tokens_per_s']:.0f} tok/s of a {d['bound_tokens_per_s']:.0f} tok/s bound = "
            f"{d['fraction_of_bound']:.1%} (goal {GOAL_DECODE:.0%}, {d['bound_kind']}-bound)"
        )
    _common.print_load(env)
    _common.finish(
        env,
        {
            "benchmark": "gpu_efficiency",
            "device": args.device,
            "workload": {
                **preset,
                "shapes": shapes,
                "gradient_checkpointing": args.gradient_checkpointing,
                "threads": args.threads,
            },
            "limits": limits,
            "models": results,
            "goals": {"mfu": GOAL_MFU, "decode_fraction_of_bound": GOAL_DECODE},
        },
        args.json,
    )
    return 0


def efficiency(
    run: dict[str, Any],
    limits: dict[str, Any],
    shape: str,
    preset: dict[str, Any],
    n_seq: int,
    prompt_tokens: int,
    dtype_bytes: int,
) -> dict[str, Any]:
    """MFU of the update and decode tokens/s against the bandwidth bound, from one training run."""
    params = run["policy_parameters"]
    t = preset["max_new_tokens"]
    steady = run["steady_state"]
    update_s = steady["perf/update_time_s"]["median"]
    rollout_s = steady["perf/rollout_time_s"]["median"]
    update_tokens = prompt_tokens + n_seq * t
    achieved = 6 * params * update_tokens / update_s
    peak, bandwidth = limits["peak_flops"], limits["bandwidth_bytes_per_s"]
    # Decode: B = n_seq sequences at once (rollout.batch_size = n_seq), average context P + T/2.
    avg_context = prompt_tokens / n_seq + t / 2
    bytes_per_step = params * dtype_bytes + n_seq * avg_context * kv_bytes_per_token(shape, dtype_bytes)
    memory_s, compute_s = bytes_per_step / bandwidth, 2 * params * n_seq / peak
    bound = n_seq / max(memory_s, compute_s)
    decode_rate = n_seq * t / rollout_s
    return {
        "parameters": params,
        "log_z_head_parameters": run["log_z_head_parameters"],
        "update": {
            "seconds": update_s,
            "tokens": update_tokens,
            "achieved_flops": achieved,
            "mfu": achieved / peak,
            "meets_goal": achieved / peak >= GOAL_MFU,
            "all_steps_s": run["per_step"]["perf/update_time_s"],
        },
        "decode": {
            "seconds": rollout_s,
            "batch": n_seq,
            "new_tokens": t,
            "tokens_per_s": decode_rate,
            "bytes_per_step": bytes_per_step,
            "bound_tokens_per_s": bound,
            "bound_kind": "memory" if memory_s >= compute_s else "compute",
            "fraction_of_bound": decode_rate / bound,
            "meets_goal": decode_rate / bound >= GOAL_DECODE,
            "all_steps_s": run["per_step"]["perf/rollout_time_s"],
        },
        "step_time_s": statistics.median(run["per_step"]["step_wall_s"][run["warmup_steps"] :]),
        "memory": run["memory"],
        "bf16_autocast": run["bf16"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
