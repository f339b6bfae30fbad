"""``flowrl plan CONFIG [key=value ...] --gpus N --gpu-memory GB``: memory per device, before any weights.

Reads the model's ``config.json`` (``model.path``'s, or ``--model-config``; nothing is downloaded) and
prints, per phase of a training step (load, rollout, log-prob passes, update, optimizer step), the memory
each component takes on one device, the peak, whether it fits, and, when it does not, the cheapest
changes that make it fit with the peak planned after each. The formulas are in :mod:`flowrl.plan` and
docs/memory.md.

Exit status: 0 when a plan was made (whether or not it fits: the table says); 2 for input that cannot
work (a config that does not load, no config.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowrl plan",
        description="Plan the memory per device of `flowrl train CONFIG [key=value ...]` from the "
        "model's config.json alone (no weights, no download).",
        epilog=(
            "example: flowrl plan configs/paper_qwen2.5-7b_math.yaml train.strategy=fsdp2 --gpus 8 "
            "--gpu-memory 80. GB = 2^30 bytes."
        ),
    )
    parser.add_argument(
        "config", metavar="CONFIG", help="YAML config (see configs/); or leave it out and give key=value only"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.lora.rank=32")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) of the run, torchrun's ranks")
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GB",
        help="memory of one device in GB (e.g. 80); CPU default: this machine's memory",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda: GPU memory per device; cpu: a CPU run's peak resident memory (process baseline included)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="GB",
        help="fit in this many GB per device instead of 95%% of --gpu-memory",
    )
    parser.add_argument(
        "--model-config",
        default=None,
        metavar="PATH",
        help="the model's config.json (file or directory); default: model.path's",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    from flowrl.config import config_arguments, load_config
    from flowrl.plan import plan_memory

    try:
        cfg = load_config(*config_arguments(args.config, args.overrides))
        plan = plan_memory(
            cfg,
            gpus=args.gpus,
            gpu_memory_gb=args.gpu_memory,
            device=args.device,
            model_config=args.model_config,
            budget_gb=args.budget,
        )
    except (ValueError, OSError) as exc:
        print(f"flowrl plan: {exc}", file=sys.stderr)
        return 2
    print(plan.summary())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
