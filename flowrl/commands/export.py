"""``flowrl export CHECKPOINT_OR_RUN_DIR OUTPUT_DIR``: a training checkpoint -> a Hugging Face model dir.

The command: flags, the summary printed and the exit status (2 for a source or output it cannot use,
the reason on stderr). The export itself, and what the directory holds, is :mod:`flowrl.export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowrl.export import export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``flowrl export``, built without running anything."""
    parser = argparse.ArgumentParser(
        prog="flowrl export",
        description="Export a training checkpoint to a Hugging Face model directory (the log Z head "
        "goes to OUTPUT_DIR/log_z_head/, outside the model weights).",
        epilog="example: flowrl export runs/flowrl OUTPUT_DIR  (the run's newest complete checkpoint)",
    )
    parser.add_argument(
        "source",
        help="a run directory (train.output_dir) or a checkpoints/step_N directory; or a verl checkpoint "
        "(trainer.default_local_dir, global_step_N or global_step_N/actor)",
    )
    parser.add_argument("output_dir", help="the model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export at OUTPUT_DIR")
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA runs: write the peft adapter directory instead of the merged model",
    )
    parser.add_argument(
        "--base", help="LoRA runs: the base model to merge into (default: the one the adapters name)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        info = export_checkpoint(
            args.source, args.output_dir, overwrite=args.overwrite, adapter=args.adapter, base=args.base
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"flowrl export: error: {exc}", file=sys.stderr)
        return 2
    head = info["log_z_head"]
    print(
        f"exported {info['source_checkpoint']} (step {info['step']}, {info['format']}) -> {args.output_dir}"
    )
    print(
        f"  log Z head: {Path(args.output_dir) / head['file']} (H={head['hidden_size']}, "
        f"{head['num_layers']} layers)"
        if head
        else "  log Z head: none (this run's objective has no head)"
    )
    if info["head_tensors_removed_from_weights"]:
        print(f"  removed {info['head_tensors_removed_from_weights']} head tensors from the model weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
