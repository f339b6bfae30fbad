"""``flowrl train CONFIG.yaml [key=value ...] [--resume | --overwrite]``: the trainer's entry point.

Exit status: 0 when the run reached ``train.total_steps``; 2 for input that cannot work (one line on
stderr naming the fix, no traceback unless ``--debug`` or ``FLOWRL_DEBUG=1``; nothing is written);
128 + the signal's number when SIGINT / SIGTERM stopped the run after writing its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    from flowrl.config import options_help

    parser = argparse.ArgumentParser(
        prog="flowrl train",
        description="Post-train a causal LM with FlowRL (or algorithm.name=grpo, dr_grpo, reinforce_pp).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example: flowrl train configs/paper_qwen2.5-7b_math.yaml model.path=Qwen/Qwen2.5-7B\n"
            "  data.train_files=[data/math_dapo.parquet] train.total_steps=20\n"
            "Ctrl-C (or SIGTERM) stops after the current step with a checkpoint; --resume continues.\n\n"
            "each objective's options (key=value overrides, defaults shown):\n" + options_help()
        ),
    )
    parser.add_argument(
        "config", metavar="CONFIG", help="YAML config (see configs/); or leave it out and give key=value only"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6 algorithm.name=grpo"
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in train.output_dir",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in train.output_dir (its metrics, checkpoints and plots are deleted)",
    )
    parser.add_argument(
        "--force", action="store_true", help="start even when the memory plan says the run does not fit"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of input errors (or FLOWRL_DEBUG=1)"
    )
    return parser


def _resume_command(argv: list[str]) -> str:
    """The command line that continues this run."""
    kept = [a for a in argv if a not in ("--resume", "--overwrite", "--force")]
    return shlex.join(["flowrl", "train", *kept, "--resume"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    debug = args.debug or os.environ.get("FLOWRL_DEBUG", "") not in ("", "0")

    from flowrl.checkpoint import CheckpointCorruptError
    from flowrl.config import config_arguments, load_config
    from flowrl.distributed import is_main_process, launched_by_torchrun
    from flowrl.preflight import InputError
    from flowrl.trainer import Trainer, run

    # Input errors are found here, before training starts (most before any weights load).
    try:
        cfg = load_config(*config_arguments(args.config, args.overrides))
        if cfg.rollout.engine == "vllm":
            from flowrl.rollout.vllm import import_vllm

            import_vllm()  # before any model is loaded: a missing vLLM fails at once, naming the fix
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    except (InputError, CheckpointCorruptError, ValueError, OSError, ImportError) as exc:
        if debug:
            raise
        if is_main_process():
            print(f"flowrl train: {exc}", file=sys.stderr)
        return 2
    result = run(trainer)
    code = 0
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        if result.stopped_by is not None:
            code = 128 + int(result.stopped_by)
            print(
                f"stopped at step {trainer.step}, checkpoint written; continue with: {_resume_command(argv)}",
                file=sys.stderr,
            )
        else:
            print(f"done: {len(result.metrics)} steps logged in {result.run_dir}")
    elif result.stopped_by is not None:
        code = 128 + int(result.stopped_by)
    if launched_by_torchrun():
        # Everything is written and the process group is gone. Skip interpreter finalization: on CPU, a
        # rank sometimes aborted there ("terminate called without an active exception", about 1 run in
        # 5 of the test suite) while tearing down C++ threads, which torchrun reports as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
