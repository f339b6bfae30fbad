"""The ``flowrl`` command: one subcommand per module of this package.

The command layer: each subcommand lives in its own module here with a ``build_parser()`` and a
``main(argv) -> int`` (argument parsing, console output, exit status) and calls the library for the
work (:mod:`flowrl.trainer`, :mod:`flowrl.export`, :mod:`flowrl.evaluation.run`, ...), which never
imports this package. This file only dispatches, and imports the module lazily so that ``flowrl toy``
does not pay for transformers. ``python -m flowrl.commands`` (and ``torchrun ... -m flowrl.commands``)
runs the same dispatcher (:mod:`flowrl.commands.__main__`).
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "toy": (
        "flowrl.commands.toy",
        "the paper's illustrative experiment (Figure 1): FlowRL vs reward maximizers",
    ),
    "demo": (
        "flowrl.commands.demo",
        "the embedded demo: tiny model, SFT warm-up, FlowRL (and --compare with GRPO)",
    ),
    "train": ("flowrl.commands.train", "post-train a causal LM: flowrl train CONFIG.yaml [key=value ...]"),
    "data": ("flowrl.commands.data", "prepare public datasets: flowrl data prepare NAME --input PATH"),
    "eval": ("flowrl.commands.eval", "evaluate checkpoints: avg@n, pass@k, maj@n, diversity"),
    "export": ("flowrl.commands.export", "export a training checkpoint to a Hugging Face model directory"),
    "plan": (
        "flowrl.commands.plan",
        "memory per device, planned from config.json: flowrl plan CONFIG --gpus N",
    ),
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
