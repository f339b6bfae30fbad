"""The ``flowrl`` command: one subcommand per entry point.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only dispatches, and
imports the module lazily so that ``flowrl toy`` does not pay for transformers.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("flowrl.toy", "the paper's illustrative experiment (Figure 1): FlowRL vs reward maximizers"),
    "demo": ("flowrl.demo", "the embedded demo: tiny model, SFT warm-up, FlowRL (and --compare with GRPO)"),
    "train": ("flowrl.train_cli", "post-train a causal LM: flowrl train CONFIG.yaml [key=value ...]"),
    "data": ("flowrl.data.prepare", "prepare public datasets: flowrl data prepare NAME --input PATH"),
    "eval": ("flowrl.evaluation.run", "evaluate checkpoints: avg@n, pass@k, maj@n, diversity"),
    "export": ("flowrl.export", "export a training checkpoint to a Hugging Face model directory"),
    "plan": ("flowrl.plan_cli", "memory per device, planned from config.json: flowrl plan CONFIG --gpus N"),
}


def _usage() -> str:
    lines = ["usage: flowrl <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `flowrl <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flowrl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # As `python -m` does: modules in the current directory import (reward.function=myreward:score).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
