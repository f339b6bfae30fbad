"""The command layer (:mod:`flowrl.commands`) sits on top of the library and nothing below imports it.

Each ``flowrl`` subcommand is a module of ``flowrl.commands`` with ``build_parser()`` and ``main(argv)``;
the library (the trainer, the export, the evaluation runner, the data converters, the toy experiment and
the demo's pieces) imports in a fresh interpreter without loading any of it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl.commands import COMMANDS

REPO = Path(__file__).parents[1]
LIBRARY = (
    "flowrl",
    "flowrl.trainer",
    "flowrl.export",
    "flowrl.evaluation",
    "flowrl.evaluation.run",
    "flowrl.data",
    "flowrl.data.prepare",
    "flowrl.plan",
    "flowrl.toy",
    "flowrl.demo",
)
# Imports the modules named on the command line, then prints every flowrl.commands module loaded.
PROBE = (
    "import importlib, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    "loaded = [m for m in sys.modules if m == 'flowrl.commands' or m.startswith('flowrl.commands.')]\n"
    "print(' '.join(sorted(loaded)))"
)


def _commands_loaded(*modules: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.slow  # two fresh interpreters importing torch and transformers
def test_the_library_imports_without_the_commands() -> None:
    assert _commands_loaded(*LIBRARY) == []
    assert _commands_loaded("flowrl.commands.toy") == [
        "flowrl.commands",
        "flowrl.commands.toy",
    ]  # the probe sees


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_is_a_module_of_the_package(name: str) -> None:
    module_name = COMMANDS[name][0]
    assert module_name == f"flowrl.commands.{name}"
    module = importlib.import_module(module_name)
    assert callable(module.build_parser) and callable(module.main)
    assert module.build_parser().prog == f"flowrl {name}"


def test_python_m_runs_the_dispatcher() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowrl.commands", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: flowrl <command> [args]")
    assert all(f"  {name:<8} " in done.stdout for name in COMMANDS)
